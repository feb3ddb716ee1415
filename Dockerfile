# syntax=docker/dockerfile:1
# The InstaShop CDC binaries (generator, cdc-reader, metrics-consumer,
# dwh-sink and, when the workspace has it, dashboard) in one small runtime image.
# docker-compose.yml runs one service per binary from this image.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds; the binaries
# are copied out in the same step because the cache is not in the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace \
    && mkdir -p /out \
    && for bin in generator cdc-reader metrics-consumer dwh-sink dashboard; do \
         if [ -x "target/release/$bin" ]; then cp "target/release/$bin" /out/; fi; \
       done

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tzdata \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app instashop
WORKDIR /app
COPY --from=build /out/ /usr/local/bin/
COPY sql/ /app/sql/
# Settings come from the environment (docker-compose.yml); no env file here.
ENV INSTASHOP_ENV_FILE="" \
    TZ=UTC
USER instashop
CMD ["generator", "--help"]
