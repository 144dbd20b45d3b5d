#!/bin/sh
# build.sh: build vmsync's Debian package with cargo-deb, and print its path.
#
#   deploy/deb/build.sh [--no-build] [CARGO-DEB OPTION...]
#
# It builds the release binary (unless --no-build: then the one already in
# the target directory is packaged, as the package test does with the binary
# it tests), writes the shell completions with that binary's
# `vmsync --completions SHELL` and a Debian changelog into
# TARGET/release/package-assets/, where the assets list in Cargo.toml takes
# them from, and runs
# `cargo deb --no-build --strip` with the other options (e.g. --fast,
# --output DIR). The target directory is cargo's: CARGO_TARGET_DIR or
# ./target. cargo-deb: cargo install --locked cargo-deb --version 3.8.0
set -eu
cd "$(dirname "$0")/../.."
cargo=${CARGO:-cargo}

build=yes
if [ "${1-}" = --no-build ]; then
    build=no
    shift
fi
if [ "$build" = yes ]; then
    "$cargo" build --release --locked --bin vmsync >&2
fi

# Cargo's own idea of the target directory (CARGO_TARGET_DIR, a config file).
target=$("$cargo" metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target" ] || {
    echo "build.sh: cargo metadata did not name the target directory" >&2
    exit 1
}
bin=$target/release/vmsync
[ -x "$bin" ] || {
    echo "build.sh: no $bin: build it first (cargo build --release), or drop --no-build" >&2
    exit 1
}

# What the package holds that the build makes: completions, and the Debian
# changelog that Debian wants beside the upstream one (CHANGELOG.md).
assets=$target/release/package-assets
mkdir -p "$assets"
"$bin" --completions bash >"$assets/vmsync.bash"
"$bin" --completions zsh >"$assets/_vmsync"
"$bin" --completions fish >"$assets/vmsync.fish"
version=$("$bin" --version | sed -n 's/^vmsync //p')
maintainer=$(sed -n 's/^maintainer = "\(.*\)"$/\1/p' Cargo.toml)
date=$(date -R -u -d "@${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")
cat <<CHANGELOG | gzip -9n >"$assets/changelog.Debian.gz"
vmsync ($version-1) unstable; urgency=medium

  * vmsync $version, packaged with cargo-deb (deploy/deb/build.sh). What
    changed is in /usr/share/doc/vmsync/changelog.gz.

 -- $maintainer  $date
CHANGELOG

# The binary is built with debug info (Cargo.toml's release profile, for
# profiling); the package gets it stripped. cargo-deb prints the .deb's path
# as its last line of output.
out=$("$cargo" deb --no-build --strip "$@")
printf '%s\n' "$out" | tail -n 1
