#!/bin/sh
# Build the native kernel for an editable checkout and put it in keyturn/ as
# keyturn/_native.abi3.so (git-ignored), where `import keyturn._native` finds
# it. Where cargo is absent, say so in one line and succeed: keyturn then
# runs its pure-Python cell path. Usage: sh native/build-dev.sh [python]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if ! command -v cargo >/dev/null 2>&1; then
    echo "native kernel: cargo not found, not built (keyturn uses its pure-Python cell path)"
    exit 0
fi
python=${1:-python3}
cd "$here"
PYO3_PYTHON=$python cargo build --release --locked --quiet
for lib in target/release/lib_native.so target/release/lib_native.dylib; do
    if [ -f "$lib" ]; then
        # Copy to a temporary name, then rename: a running interpreter never sees half a file.
        cp "$lib" ../keyturn/_native.abi3.so.tmp
        mv -f ../keyturn/_native.abi3.so.tmp ../keyturn/_native.abi3.so
        echo "native kernel: built keyturn/_native.abi3.so"
        exit 0
    fi
done
echo "native kernel: cargo built no library" >&2
exit 1
