#!/usr/bin/env bash
# The image's health check: GET /ping on the inference listener, healthy on 200. Plain bash
# (its /dev/tcp), so the image needs no HTTP client. HEALTHCHECK_PORT moves it.
exec 3<>"/dev/tcp/127.0.0.1/${HEALTHCHECK_PORT:-8080}" || exit 1
printf 'GET /ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
read -r -t 5 _ status _ <&3 || exit 1
[ "$status" = 200 ]
