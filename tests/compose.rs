//! `docker-compose.yml` cannot run here (no Docker engine), so its structure is checked: every
//! role is there with a healthcheck, every `TOPK_…` variable it sets is one the role's command
//! reads (as `topk <role> --help` lists it), the published ports are the contract's defaults,
//! and the migrations use only the MergeTree syntax a current ClickHouse accepts.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

/// The compose file as JSON (PyYAML, installed with schemathesis by `scripts/stack install`,
/// resolves the `<<` merge keys).
fn compose() -> Value {
    compose_file("docker-compose.yml")
}

/// A compose file of the workspace as JSON.
fn compose_file(name: &str) -> Value {
    let output = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(common::workspace_root().join(name))
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "docker-compose.yml parses: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from python")
}

fn help(subcommand: &str) -> String {
    let output = Command::new(common::topk_bin())
        .args([subcommand, "--help"])
        .output()
        .expect("topk runs");
    assert!(output.status.success(), "topk {subcommand} --help");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn every_role_reads_the_variables_compose_sets() {
    let compose = compose();
    let services = compose["services"].as_object().expect("services");
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    for required in [
        "kafka",
        "clickhouse",
        "redis",
        "create-topics",
        "migrate",
        "aggregator",
        "maintenance",
        "refresher",
        "warmup",
        "archiver",
        "s3",
        "create-bucket",
        "api",
    ] {
        assert!(names.contains(required), "service {required} missing");
    }
    /// Connection settings every role gets from one YAML anchor.
    const SHARED: [&str; 3] = ["TOPK_KAFKA_", "TOPK_CLICKHOUSE_", "TOPK_REDIS_"];
    let mut roles = BTreeSet::new();
    let (mut read, mut shared) = (BTreeSet::new(), BTreeSet::new());
    for (name, service) in services {
        if !ONE_SHOT.contains(&name.as_str()) {
            assert!(
                service.get("healthcheck").is_some(),
                "{name} has no healthcheck"
            );
        }
        if service.get("build").is_none() {
            continue;
        }
        let command = service["command"][0]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: command starts with a topk subcommand"));
        roles.insert(command.to_owned());
        let help = help(command);
        let env = service["environment"]
            .as_object()
            .unwrap_or_else(|| panic!("{name}: environment map"));
        for variable in env.keys().filter(|k| k.starts_with("TOPK_")) {
            // A variable is read when it is a flag's (`[env: …]`) or named in a flag's help
            // (secrets: read from the environment only, never a flag).
            if help.contains(&format!("[env: {variable}]"))
                || help.contains(&format!("[env: {variable}="))
                || help.contains(&format!("`{variable}`"))
            {
                read.insert(variable.clone());
            } else if SHARED.iter().any(|prefix| variable.starts_with(prefix)) {
                // The shared connection block goes to every role; some roles need only part.
                shared.insert(variable.clone());
            } else {
                panic!("{name} sets {variable}, which `topk {command}` does not read");
            }
        }
    }
    for variable in &shared {
        assert!(read.contains(variable), "no role reads {variable}");
    }
    assert_eq!(
        roles,
        [
            "aggregate",
            "archive",
            "create-topics",
            "maintain",
            "migrate",
            "refresh",
            "serve",
            "warmup"
        ]
        .map(str::to_owned)
        .into_iter()
        .collect::<BTreeSet<_>>()
    );
    // Secrets come from the operator's environment, never from the file itself.
    for (name, service) in services {
        let Some(env) = service.get("environment").and_then(|e| e.as_object()) else {
            continue;
        };
        for (variable, value) in env {
            if variable.contains("SECRET") || variable.contains("PASSWORD") {
                let value = value.as_str().unwrap_or_default();
                assert!(
                    value.starts_with("${") && value.contains(":?"),
                    "{name}: {variable} must be a required ${{VAR:?…}} interpolation, not {value:?}"
                );
            }
        }
    }
    // The contract's default ports (docs/contracts.md, "Defaults"); only the API's beyond this
    // machine.
    for (service, port) in [
        ("kafka", "127.0.0.1:9092:9092"),
        ("clickhouse", "127.0.0.1:8123:8123"),
        ("redis", "127.0.0.1:6379:6379"),
        ("api", "8080:8080"),
    ] {
        let ports = services[service]["ports"].as_array().expect("ports");
        assert!(
            ports.iter().any(|p| p.as_str() == Some(port)),
            "{service} publishes {port}"
        );
    }
}

/// The services that run once and exit (`restart: on-failure`); every other one runs for good.
const ONE_SHOT: [&str; 4] = ["create-topics", "migrate", "warmup", "create-bucket"];

/// Every image the deployment pulls, pinned: a tag that is not published any more (MinIO left
/// Docker Hub in 2026-09) fails `docker compose up` at the pull.
const IMAGES: [(&str, &str); 5] = [
    ("kafka", "apache/kafka:3.9.1"),
    ("clickhouse", "clickhouse/clickhouse-server:25.8"),
    ("redis", "redis:7.4"),
    ("s3", "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z"),
    (
        "create-bucket",
        "quay.io/minio/mc:RELEASE.2025-08-13T08-35-41Z",
    ),
];

/// Seconds of a compose duration such as `45s` or `1m30s`.
fn seconds(duration: &str) -> u64 {
    humantime::parse_duration(duration)
        .unwrap_or_else(|_| panic!("a compose duration: {duration}"))
        .as_secs()
}

/// What no Docker engine is needed to check: the deployment keeps its data across `down` + `up`
/// (named volumes where each image writes), restarts what runs for good, gives the roles that
/// flush on SIGTERM time to finish, hands host clients a Kafka address they can reach, starts
/// the API after the schema, pulls only pinned images that exist, and builds from the sources
/// only.
#[test]
fn compose_keeps_data_restarts_roles_and_lets_them_finish() {
    let compose = compose();
    let services = compose["services"].as_object().expect("services");
    let declared: BTreeSet<&str> = compose["volumes"]
        .as_object()
        .expect("named volumes")
        .keys()
        .map(String::as_str)
        .collect();
    let mounts = |name: &str| -> Vec<(String, String)> {
        services[name]["volumes"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} has volumes"))
            .iter()
            .map(|v| {
                let (volume, path) = v
                    .as_str()
                    .expect("short syntax")
                    .split_once(':')
                    .expect("v:p");
                (volume.to_owned(), path.to_owned())
            })
            .collect()
    };
    let kafka_env = &services["kafka"]["environment"];
    let log_dirs = kafka_env["KAFKA_LOG_DIRS"]
        .as_str()
        .expect("KAFKA_LOG_DIRS set");
    for (service, path) in [
        ("kafka", log_dirs),
        ("clickhouse", "/var/lib/clickhouse"),
        ("redis", "/data"),
        ("s3", "/data"),
    ] {
        let mounted = mounts(service);
        assert!(
            mounted
                .iter()
                .any(|(volume, at)| at == path && declared.contains(volume.as_str())),
            "{service} keeps {path} on a named volume: {mounted:?}"
        );
    }
    let redis_command = words(&services["redis"]["command"]);
    assert!(
        redis_command.contains("redis-server") && redis_command.contains("--appendonly yes"),
        "redis persists its writes: {redis_command}"
    );

    // Host clients get localhost:9092 (the published port); containers the internal listener,
    // which is what the roles are given.
    let advertised = kafka_env["KAFKA_ADVERTISED_LISTENERS"]
        .as_str()
        .expect("advertised");
    assert!(advertised.contains("://localhost:9092"), "{advertised}");
    let brokers = services["aggregator"]["environment"]["TOPK_KAFKA_BROKERS"]
        .as_str()
        .expect("brokers");
    assert!(
        advertised.contains(&format!("://{brokers}")),
        "the roles' brokers {brokers} are an advertised listener: {advertised}"
    );

    for (name, service) in services {
        let restart = service["restart"].as_str().unwrap_or("no");
        if ONE_SHOT.contains(&name.as_str()) {
            assert_eq!(restart, "on-failure", "{name} runs once");
        } else {
            assert_eq!(restart, "unless-stopped", "{name} runs for good");
        }
        if let Some(image) = service["image"].as_str() {
            assert!(
                IMAGES.contains(&(name.as_str(), image)),
                "{name}: image {image} is not on the pinned list"
            );
        }
    }
    // The final flush (aggregator) and upload (archiver) get their whole 30 s shutdown timeout
    // (`--shutdown-timeout`) before compose's SIGKILL; the API its 10 s drain.
    for (role, needed) in [("aggregator", 30), ("archiver", 30), ("api", 10)] {
        let grace = services[role]["stop_grace_period"]
            .as_str()
            .map_or(10, seconds);
        assert!(
            grace > needed,
            "{role}: stop_grace_period {grace}s <= {needed}s"
        );
    }
    assert_eq!(
        services["api"]["depends_on"]["migrate"]["condition"], "service_completed_successfully",
        "the API starts after the schema"
    );

    let ignore = std::fs::read_to_string(common::workspace_root().join(".dockerignore"))
        .expect(".dockerignore beside the Dockerfile");
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for path in ["target/", ".stack/", ".git/", ".env"] {
        assert!(ignored.contains(path), ".dockerignore leaves out {path}");
    }
}

#[test]
fn migrations_use_syntax_a_current_clickhouse_accepts() {
    let dir = common::workspace_root().join("schema");
    let mut tables = 0;
    for entry in std::fs::read_dir(&dir).expect("schema folder") {
        let path = entry.expect("entry").path();
        let sql = std::fs::read_to_string(&path).expect("readable");
        let code: String = sql
            .lines()
            .filter(|line| !line.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        for statement in code.split(';').filter(|s| s.contains("CREATE TABLE")) {
            tables += 1;
            // Current ClickHouse rejects the old `MergeTree(date, key, granularity)` form unless
            // told to allow deprecated syntax: every table must declare ORDER BY instead.
            assert!(
                statement.contains("ORDER BY"),
                "{}: a table without ORDER BY (old MergeTree syntax)",
                path.display()
            );
            // `ENGINE = Name` or `ENGINE = Name(args)`: the arguments right after the name.
            let engine = statement
                .split("ENGINE")
                .nth(1)
                .unwrap_or_else(|| panic!("{}: ENGINE clause", path.display()))
                .trim_start_matches([' ', '=', '\n']);
            let name_end = engine
                .find(|c: char| !c.is_alphanumeric())
                .unwrap_or(engine.len());
            let args = engine[name_end..]
                .strip_prefix('(')
                .and_then(|rest| rest.split_once(')'))
                .map_or("", |(args, _)| args);
            assert!(
                !args.contains(','),
                "{}: engine parameters in the old form: ({args})",
                path.display()
            );
            for unsupported in ["allow_experimental", "LowCardinality", "TTL "] {
                assert!(
                    !statement.contains(unsupported),
                    "{}: {unsupported} is not available on ClickHouse 18.16",
                    path.display()
                );
            }
        }
    }
    assert!(tables >= 6, "every table checked ({tables})");
}

/// `check-jsonschema` (PyPI, pinned in `scripts/stack install`) against the compose-spec schema
/// it ships: the file is valid compose (a key compose does not know, a value of the wrong type,
/// fails `docker compose up` before anything starts), and the same check refuses a copy with
/// one key misspelt, so it is not vacuous.
#[test]
fn compose_file_is_valid_by_the_compose_spec_schema() {
    let check = |path: &std::path::Path| {
        let output = Command::new("check-jsonschema")
            .args(["--builtin-schema", "vendor.compose-spec"])
            .arg(path)
            .output()
            .expect("check-jsonschema runs (scripts/stack install)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    };
    for name in ["docker-compose.yml", "docker-compose.cluster.yml"] {
        let (valid, report) = check(&common::workspace_root().join(name));
        assert!(valid, "{name} against the compose spec: {report}");
    }
    let file = common::workspace_root().join("docker-compose.yml");

    let text = std::fs::read_to_string(&file).expect("compose file");
    let dir = tempfile::tempdir().expect("tempdir");
    let misspelt = dir.path().join("docker-compose.yml");
    std::fs::write(
        &misspelt,
        text.replacen("    healthcheck:\n", "    healthchek:\n", 1),
    )
    .expect("write");
    let (valid, report) = check(&misspelt);
    assert!(!valid, "a misspelt key must be refused: {report}");
    assert!(report.contains("healthchek"), "{report}");
}

/// A command or healthcheck list as one line (a shell command's words and the list's alike).
fn words(value: &Value) -> String {
    value
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `value` is the required interpolation of the operator's `variable`
/// (`${VARIABLE:?reason}`: compose refuses to start without it).
fn required_from(value: &Value, variable: &str) -> bool {
    value
        .as_str()
        .is_some_and(|v| v.starts_with(&format!("${{{variable}:?")) && v.ends_with('}'))
}

/// Secure by default: ClickHouse and Redis take the operator's passwords (the ClickHouse image's
/// passwordless `default` user replaced, Redis with `requirepass`), every role that reaches them
/// gets the same credentials, the API requires bearer tokens, and only the API is published
/// beyond the machine.
#[test]
fn compose_requires_passwords_and_a_token_and_publishes_only_the_api() {
    let compose = compose();
    let services = compose["services"].as_object().expect("services");
    for (name, service) in services {
        for port in service["ports"].as_array().into_iter().flatten() {
            let port = port.as_str().expect("short syntax");
            assert!(
                name == "api" || port.starts_with("127.0.0.1:"),
                "{name} publishes {port} on every interface"
            );
        }
    }

    let clickhouse = &services["clickhouse"]["environment"];
    assert!(
        clickhouse.get("CLICKHOUSE_SKIP_USER_SETUP").is_none(),
        "the image's user setup replaces the passwordless default user"
    );
    assert!(
        required_from(
            &clickhouse["CLICKHOUSE_PASSWORD"],
            "TOPK_CLICKHOUSE_PASSWORD"
        ),
        "{clickhouse}"
    );
    let clickhouse_user = clickhouse["CLICKHOUSE_USER"].as_str().expect("a user");
    assert_ne!(clickhouse_user, "default");

    let redis = &services["redis"];
    assert!(
        required_from(
            &redis["environment"]["REDIS_PASSWORD"],
            "TOPK_REDIS_PASSWORD"
        ),
        "{redis}"
    );
    let command = words(&redis["command"]);
    assert!(
        command.contains("redis-server") && command.contains("--requirepass \"$$REDIS_PASSWORD\""),
        "{command}"
    );
    let probe = words(&redis["healthcheck"]["test"]);
    assert!(
        probe.contains("REDISCLI_AUTH=\"$$REDIS_PASSWORD\""),
        "{probe}"
    );

    let mut roles = 0;
    for (name, service) in services.iter().filter(|(_, s)| s.get("build").is_some()) {
        roles += 1;
        let env = &service["environment"];
        if env.get("TOPK_CLICKHOUSE_URL").is_some() {
            assert_eq!(env["TOPK_CLICKHOUSE_USER"], clickhouse_user, "{name}");
            assert!(
                required_from(&env["TOPK_CLICKHOUSE_PASSWORD"], "TOPK_CLICKHOUSE_PASSWORD"),
                "{name}"
            );
        }
        if env.get("TOPK_REDIS_URL").is_some() {
            assert!(
                required_from(&env["TOPK_REDIS_PASSWORD"], "TOPK_REDIS_PASSWORD"),
                "{name}"
            );
        }
    }
    assert_eq!(roles, 8);
    assert!(
        required_from(
            &services["api"]["environment"]["TOPK_JWT_SECRET"],
            "TOPK_JWT_SECRET"
        ),
        "the API's authentication is on"
    );
}

/// The shared libraries of `debian:bookworm-slim` (packages libc6, libgcc-s1, libstdc++6,
/// zlib1g, libzstd1, liblzma5, libbz2-1.0, libcrypt1: all in the slim image, which apt and dpkg
/// need).
const BOOKWORM_SLIM: [&str; 15] = [
    "ld-linux-x86-64.so.2",
    "libc.so.6",
    "libm.so.6",
    "libpthread.so.0",
    "libdl.so.2",
    "librt.so.1",
    "libresolv.so.2",
    "libutil.so.1",
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "libz.so.1",
    "libzstd.so.1",
    "liblzma.so.5",
    "libbz2.so.1.0",
    "libcrypt.so.1",
];

/// The libraries a package the Dockerfile installs brings (with its dependencies).
fn package_libraries(package: &str) -> &'static [&'static str] {
    match package {
        // ca-certificates depends on openssl, hence libssl3.
        "ca-certificates" => &["libssl.so.3", "libcrypto.so.3"],
        "curl" => &["libcurl.so.4", "libssl.so.3", "libcrypto.so.3"],
        other => panic!("the Dockerfile installs {other}: add what it brings here"),
    }
}

/// The runtime image (`debian:bookworm-slim` plus the packages the Dockerfile installs) holds
/// every shared library the `topk` binary needs (`readelf`: its interpreter and `NEEDED`
/// entries): a dependency that starts linking, say, libsasl2 would build and then fail at the
/// container's first start.
#[test]
fn the_runtime_image_has_every_library_topk_links() {
    let dockerfile =
        std::fs::read_to_string(common::workspace_root().join("Dockerfile")).expect("Dockerfile");
    let runtime = dockerfile
        .rsplit("\nFROM ")
        .next()
        .expect("a runtime stage");
    assert_eq!(
        runtime.split_whitespace().next(),
        Some("debian:bookworm-slim"),
        "the runtime stage's base (this test knows its libraries)"
    );
    let mut available: BTreeSet<&str> = BOOKWORM_SLIM.into_iter().collect();
    let install = runtime
        .split("apt-get install")
        .nth(1)
        .expect("the runtime stage installs packages");
    let packages: Vec<&str> = install
        .split("&&")
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .filter(|word| !word.starts_with('-') && *word != "\\")
        .collect();
    assert!(packages.contains(&"ca-certificates"), "{packages:?}");
    for package in packages {
        available.extend(package_libraries(package));
    }

    let readelf = |flag: &str| {
        let output = Command::new("readelf")
            .arg(flag)
            .arg(common::topk_bin())
            .output()
            .expect("readelf runs (binutils)");
        assert!(output.status.success(), "readelf {flag}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let needed: Vec<String> = readelf("-d")
        .lines()
        .filter(|line| line.contains("(NEEDED)"))
        .filter_map(|line| {
            line.split_once('[')?
                .1
                .split_once(']')
                .map(|(l, _)| l.to_owned())
        })
        .collect();
    assert!(needed.contains(&"libc.so.6".to_owned()), "{needed:?}");
    for library in &needed {
        assert!(
            available.contains(library.as_str()),
            "topk links {library}, which the runtime image does not have: {needed:?}"
        );
    }
    let headers = readelf("-l");
    let interpreter = headers
        .split("[Requesting program interpreter: ")
        .nth(1)
        .and_then(|rest| rest.split_once(']'))
        .map(|(path, _)| path)
        .expect("a dynamic executable");
    let name = interpreter.rsplit('/').next().unwrap_or_default();
    assert!(available.contains(name), "interpreter {interpreter}");
}

/// The servers of each shard of `cluster` in deploy/clickhouse/cluster.xml, in order, as
/// `host:port` (Python's XML parser: no XML crate for one test).
fn cluster_xml_shards(cluster: &str) -> Vec<Vec<String>> {
    let output = Command::new("python3")
        .args([
            "-c",
            "import json, sys, xml.etree.ElementTree as t\n\
             c = t.parse(sys.argv[1]).getroot().find('remote_servers').find(sys.argv[2])\n\
             json.dump([[r.findtext('host') + ':' + r.findtext('port') for r in s.findall('replica')] \
                        for s in c.findall('shard')] if c is not None else [], sys.stdout)",
        ])
        .arg(common::workspace_root().join("deploy/clickhouse/cluster.xml"))
        .arg(cluster)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "cluster.xml parses: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from python")
}

/// docker-compose.cluster.yml, laid over docker-compose.yml: every role that reads ClickHouse
/// (and no other) is told the cluster and its shard URLs; the first URL is the base file's
/// ClickHouse (the meta server); each URL names a server of the same image with the cluster
/// config mounted, whose `remote_servers` lists the same servers in the same order on their
/// native port, one replica each: the layout `topk` checks at start.
#[test]
fn the_cluster_variant_tells_every_clickhouse_role_the_same_layout() {
    let base = compose();
    let overlay = compose_file("docker-compose.cluster.yml");
    let base_services = base["services"].as_object().expect("services");
    let services = overlay["services"].as_object().expect("services");
    let image = base_services["clickhouse"]["image"].clone();
    let mut roles = BTreeSet::new();
    for (name, service) in base_services {
        let Some(command) = service["command"][0].as_str() else {
            continue;
        };
        if service.get("build").is_none() {
            continue;
        }
        let reads_cluster = help(command).contains("[env: TOPK_CLICKHOUSE_CLUSTER");
        let env = &services
            .get(name)
            .map_or(Value::Null, |s| s["environment"].clone());
        for variable in ["TOPK_CLICKHOUSE_CLUSTER", "TOPK_CLICKHOUSE_SHARD_URLS"] {
            assert_eq!(
                env.get(variable).is_some(),
                reads_cluster,
                "{name} (`topk {command}`): {variable} set exactly when the role reads it"
            );
        }
        if reads_cluster {
            roles.insert(name.as_str());
        }
    }
    assert!(
        roles.contains("aggregator") && roles.contains("api"),
        "{roles:?}"
    );
    let env = &services["aggregator"]["environment"];
    let cluster = env["TOPK_CLICKHOUSE_CLUSTER"].as_str().expect("a name");
    let urls: Vec<&str> = env["TOPK_CLICKHOUSE_SHARD_URLS"]
        .as_str()
        .expect("a list")
        .split(',')
        .collect();
    assert!(urls.len() >= 2, "{urls:?}");
    assert_eq!(
        Some(urls[0]),
        base["x-topk-env"]["TOPK_CLICKHOUSE_URL"].as_str(),
        "the meta server is the first shard"
    );
    const MOUNT: &str = "/etc/clickhouse-server/config.d/topk-cluster.xml";
    let mut hosts = Vec::new();
    for url in &urls {
        let host_port = url.strip_prefix("http://").expect("an http URL");
        let (host, port) = host_port.split_once(':').expect("host:port");
        assert_eq!(port, "8123", "{url}: the HTTP port");
        let service = services.get(host).unwrap_or(&Value::Null);
        let image_of = service
            .get("image")
            .or_else(|| base_services[host].get("image"));
        assert_eq!(image_of, Some(&image), "{host}: the same ClickHouse image");
        let mounted = service["volumes"].as_array().is_some_and(|volumes| {
            volumes
                .iter()
                .any(|v| v.as_str() == Some(&format!("./deploy/clickhouse/cluster.xml:{MOUNT}:ro")))
        });
        assert!(mounted, "{host} mounts the cluster config");
        if !base_services.contains_key(host) {
            assert!(
                service.get("healthcheck").is_some(),
                "{host} has a healthcheck"
            );
            let data = service["volumes"][0].as_str().expect("a data volume");
            let volume = data.split_once(':').expect("v:p").0;
            assert!(
                overlay["volumes"].get(volume).is_some(),
                "{volume} declared"
            );
        }
        hosts.push(vec![format!("{host}:9000")]);
    }
    assert_eq!(
        cluster_xml_shards(cluster),
        hosts,
        "remote_servers of {cluster}"
    );
    assert_eq!(
        services["migrate"]["depends_on"]["clickhouse-2"]["condition"], "service_healthy",
        "migrate waits for every shard"
    );
}
