#!/usr/bin/env bash
# Makes a root filesystem tar from this Debian machine's own python3 (with pip, glibc, CA
# certificates and busybox for /bin/sh), to build docs/deploy/Containerfile on where no base
# image can be pulled:
#
#   bash docs/deploy/host-python-rootfs.sh /tmp/host-python.tar
#   DEPLOY_TEST_BASE_ROOTFS=/tmp/host-python.tar python3 -m pytest tests/test_deploy_units.py
#
# A stand-in for python:3.11-slim, good for checking the Containerfile and the Quadlet's
# options, not for production. Needs: python3 (>= 3.11) and python3-pip from Debian, busybox.
set -euo pipefail
out=${1:?usage: host-python-rootfs.sh OUT.tar}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
py=$(readlink -f /usr/bin/python3)
ver=$(basename "$py")
mkdir -p "$root"/{bin,etc,tmp,root,usr/bin,usr/lib,usr/local/bin}
chmod 1777 "$root/tmp"
cp -a "$py" "$root/usr/bin/"
ln -s "$ver" "$root/usr/bin/python3"
tar -C / --exclude=__pycache__ --exclude=test --exclude=idlelib --exclude=tkinter \
  -cf - "usr/lib/$ver" usr/lib/python3/dist-packages | tar -C "$root" -xf -
# Like the python images: pip may install into the system interpreter.
rm -f "$root/usr/lib/$ver/EXTERNALLY-MANAGED"
libs=$({ ldd "$py"; find "/usr/lib/$ver/lib-dynload" /usr/lib/python3/dist-packages \
  -name '*.so' -exec ldd {} \; ; } 2>/dev/null | grep -o '/[^ ]*\.so[^ ]*' | sort -u)
for lib in $libs $(dpkg -L libc6 | grep -E '\.so(\.[0-9]+)*$'); do
  [ -f "$lib" ] || continue
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp -a /etc/ssl "$root/etc/"
cp -a /usr/lib/ssl "$root/usr/lib/"
cp "$(command -v busybox)" "$root/bin/busybox"
for applet in sh rm mkdir ls cat env cp mv ln chmod; do ln -s busybox "$root/bin/$applet"; done
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
tar -C "$root" -cf "$out" .
echo "wrote $out ($(du -h "$out" | cut -f1))"
