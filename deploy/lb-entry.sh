#!/bin/sh
# The load balancer's entry point (nginx). nginx.conf proxies to the name `fanout-nodes`, which every
# running node container carries as a network alias, and resolves it per request through `resolver` (nginx
# 1.22 has no `resolve` on upstream servers): a node that stops drops out of DNS, one that (re)starts on a
# new address comes in, and nginx starts even while nodes are down. `resolver` needs an address, not a
# file: take the container's DNS server from /etc/resolv.conf, the first only (nginx asks its
# resolvers in turn, and the others, the host's, do not know the containers) (docker: 127.0.0.11, podman: the network's
# gateway).
set -eu
server=$(awk '$1 == "nameserver" { a = $2; if (a ~ /:/) a = "[" a "]"; print a; exit }' /etc/resolv.conf)
echo "resolver ${server:-127.0.0.11} valid=2s ipv6=off;" >/etc/nginx/fanout-resolver.conf
exec nginx -g 'daemon off;'
