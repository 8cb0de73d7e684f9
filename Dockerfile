# keel container image: two stages, dependencies cached, non-root runtime.
#   docker build -t keel .
#   docker run -v keel-data:/var/lib/keel -p 7878:7878 -e KEEL_WEBHOOK_SECRET=… keel
# keel listens on 0.0.0.0 here, so it refuses to start with an unsigned
# webhook: set KEEL_WEBHOOK_SECRET (clients sign with X-Keel-Signature), or
# KEEL_WEBHOOK_ALLOW_UNSIGNED=true to opt out. Admin endpoints (/v1/sessions*)
# answer loopback peers only, i.e. from inside the container.
# `docker stop` sends SIGTERM and waits 10 s by default, longer than keel's
# 5 s drain deadline (shutdown_timeout_ms); raise both together.

FROM rust:1-bookworm AS build
# SQLCipher (bundled) links the system libcrypto.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Cache dependencies: build once with stub sources.
COPY Cargo.toml Cargo.lock ./
COPY actors/Cargo.toml actors/Cargo.toml
COPY bench/Cargo.toml bench/Cargo.toml
RUN mkdir -p src actors/src bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch actors/src/lib.rs bench/src/lib.rs \
 && cargo fetch --locked \
 && cargo build --release --locked --bin keel || true
COPY . .
RUN touch src/main.rs actors/src/lib.rs bench/src/lib.rs \
 && cargo build --release --locked --bin keel \
 && install -m 0755 target/release/keel /usr/local/bin/keel

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/keel keel \
 && mkdir -p /var/lib/keel && chown keel:keel /var/lib/keel && chmod 0700 /var/lib/keel
COPY --from=build /usr/local/bin/keel /usr/local/bin/keel
USER keel
VOLUME ["/var/lib/keel"]
EXPOSE 7878
ENV KEEL_DATA_DIR=/var/lib/keel KEEL_LISTEN=0.0.0.0:7878
STOPSIGNAL SIGTERM
# Exec form: keel is PID 1 and receives SIGTERM itself.
ENTRYPOINT ["/usr/local/bin/keel", "run"]
