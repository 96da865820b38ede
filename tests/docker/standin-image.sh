#!/bin/sh
# Build a stand-in for a Docker Hub base image from Debian's own packages, for machines
# that reach Debian's archive but not Docker Hub (make test-docker uses it only when the
# real image cannot be pulled).
#   standin-image.sh python TAG   Debian 12's Python 3.11 with venv, as python:3.11-slim
#   standin-image.sh nginx TAG    Debian 12's nginx with envsubst, as nginx:1.28
# The machine's CA bundle is trusted inside (with pip told to use it), as corporate base
# images carry their network's CA: where TLS is inspected, pip reaches PyPI only so.
set -eu
kind=$1 tag=$2
case "$kind" in
    python) packages=python3,python3-venv,python-is-python3,ca-certificates
            changes='CMD ["python3"]' ;;
    nginx)  packages=nginx-light,gettext-base,ca-certificates
            changes='CMD ["nginx", "-g", "daemon off;"]' ;;
    *) echo "standin-image.sh: unknown kind: $kind (python or nginx)" >&2; exit 2 ;;
esac
root=$(mktemp -d "${TMPDIR:-/tmp}/standin-$kind.XXXXXX")
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include="$packages" bookworm "$root" \
    "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
chmod 755 "$root"  # mktemp made it 700: the image's / would be root's alone
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$root/etc/pip.conf"
# What Debian's own slim images leave out too: documentation, manuals, translations.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/*
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change "$changes" - "$tag" >/dev/null
echo "standin-image.sh: $tag built from Debian bookworm ($packages)"
