#!/bin/sh
# A launcher in the style of many images: the shell stays in front, the
# server is its forked child, and a TERM to the shell reaches the server.
redis-server --protected-mode no --appendonly yes --appendfsync everysec --save "" --dir /data "$@" &
child=$!
trap 'kill -TERM $child' TERM INT
wait $child
wait $child
