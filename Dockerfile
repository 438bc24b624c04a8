# latchkey: build in the Rust image, run in a slim Debian with the system CA roots.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/latchkey

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/latchkey /usr/local/bin/latchkey
COPY config/docker.toml /etc/latchkey/latchkey.toml
USER 65534:65534
EXPOSE 8080 9090
ENTRYPOINT ["latchkey"]
CMD ["serve", "--config", "/etc/latchkey/latchkey.toml"]
