#!/bin/sh
# Makes a private CA and a server certificate for Redis (names "redis" and "localhost")
# in ./tls, for deploy/tls-redis/compose.yaml. Needs openssl. Run once from this folder.
set -eu
mkdir -p tls
cd tls
openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=send-gateway example CA" \
  -keyout ca.key -out ca.crt
openssl req -newkey rsa:2048 -nodes -subj "/CN=redis" -keyout redis.key -out redis.csr
printf 'subjectAltName=DNS:redis,DNS:localhost,IP:127.0.0.1\n' > san.ext
openssl x509 -req -in redis.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
  -extfile san.ext -out redis.crt
rm -f redis.csr san.ext ca.srl
# Redis runs as uid 999 in the official image and must read its key.
chmod 644 ca.crt redis.crt
chmod 640 redis.key
echo "certificates in $(pwd)"
