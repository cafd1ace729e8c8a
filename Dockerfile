# One image for every topk role: `docker run topk <subcommand>`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p topk-cli --bin topk

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/topk /usr/local/bin/topk
USER nobody
ENTRYPOINT ["/usr/local/bin/topk"]
