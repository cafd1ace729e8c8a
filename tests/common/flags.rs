//! Settings from command-line flags, parsed exactly as the `topk` subcommands parse them. Shared
//! with the benchmarks (`benches/common` includes this file), so it uses nothing else of
//! `tests/common`.

/// `T` parsed from `flags` (without the program name), as `topk <subcommand> <flags…>` would
/// parse them: defaults and `TOPK_…` variables included; exits the process on a bad flag.
pub fn parse<T: clap::Args>(flags: impl IntoIterator<Item = impl Into<std::ffi::OsString>>) -> T {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli<T: clap::Args> {
        #[command(flatten)]
        args: T,
    }
    let argv =
        std::iter::once(std::ffi::OsString::from("topk")).chain(flags.into_iter().map(Into::into));
    Cli::<T>::parse_from(argv).args
}
