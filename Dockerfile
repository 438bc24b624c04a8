# latchkey's image: one static binary, the CA roots, nothing else (no shell, no libc, no package
# manager), run as a non-root user.
#
#   docker build -t latchkey:0.1.0 .
#
# The binary is linked statically against glibc (crt-static), so it needs no shared library at
# run time; its allocator is mimalloc, built in, with the settings below (the binary would
# otherwise start itself again with them: src/bin/latchkey/main.rs). The image is 15.1 MiB:
# the stripped binary 14.9 MiB, the CA roots 0.2 MiB.
#
# No container runs where the project is tested, and this base image cannot be fetched there:
# scripts/check-image builds the binary with these commands, lays out the final stage's files in
# a directory, builds the final stage from them with podman (15,832,162 bytes), and runs
# latchkey from them under chroot (it resolves Vault's name from
# the image's /etc/hosts and from DNS, logs in, serves a request, and `latchkey env` writes the
# CA bundle).
#
# The profile-guided build (the one the README's performance figures are for): run
# scripts/build-pgo where the load benchmark's tools are (OpenBao, nginx, wrk), copy
# target/pgo/latchkey.profdata into the build context as pgo/latchkey.profdata, and build with
#   docker build --build-arg PGO_PROFILE=pgo/latchkey.profdata -t latchkey:0.1.0 .
# The profile fits the source and the Rust toolchain it was made with; scripts/check-image takes
# the same PGO_PROFILE from its environment.
FROM rust:1-bookworm AS build
ARG PGO_PROFILE=
WORKDIR /src
COPY . .
RUN target="$(rustc -vV | sed -n 's/^host: //p')" \
 && RUSTFLAGS="-C target-feature=+crt-static${PGO_PROFILE:+ -Cprofile-use=/src/$PGO_PROFILE}" \
    cargo build --release --locked --target "$target" --bin latchkey \
 && install -D -m 0755 "target/$target/release/latchkey" /image/usr/local/bin/latchkey \
 && strip /image/usr/local/bin/latchkey \
 && install -D -m 0644 /etc/ssl/certs/ca-certificates.crt /image/etc/ssl/certs/ca-certificates.crt \
 && install -D -m 0644 config/docker.toml /image/etc/latchkey/latchkey.toml \
 && install -d -m 1777 /image/tmp

FROM scratch
COPY --from=build /image/ /
ENV PATH=/usr/local/bin MIMALLOC_PURGE_DELAY=0 MIMALLOC_ARENA_EAGER_COMMIT=0
# An unnamed user: nothing in the image belongs to it, and it can write only /tmp.
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/latchkey"]
CMD ["serve", "--config", "/etc/latchkey/latchkey.toml"]
