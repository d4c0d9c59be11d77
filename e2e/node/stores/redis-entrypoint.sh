#!/bin/sh
# The lab's Redis image (Debian's redis-server): like the upstream image, the container's
# arguments are the command (`redis-server CONFIG --requirepass ...`), run as the pod's user.
set -eu
if [ "$#" -eq 0 ]; then set -- redis-server; fi
exec "$@"
