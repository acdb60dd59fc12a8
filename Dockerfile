# The caching proxy example with every store compiled in. Used by docker-compose.yml.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --example caching_proxy --features redis,memcached

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/examples/caching_proxy /usr/local/bin/caching_proxy
ENTRYPOINT ["/usr/local/bin/caching_proxy"]
