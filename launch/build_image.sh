#!/usr/bin/env bash
# Build the training image with podman (or docker) from the repository's Dockerfile.
#
#   launch/build_image.sh                          # CUDA base (the Dockerfile's default), tag proxygml:latest
#   launch/build_image.sh --debian                 # a Debian bookworm base made here with debootstrap (no registry
#                                                  # needed), tag localhost/proxygml:debian
#   launch/build_image.sh --base IMAGE --tag TAG   # any base with apt (Debian / Ubuntu)
#
# Options:
#   --base IMAGE   the Dockerfile's CUDA_IMAGE build argument (default: the Dockerfile's own)
#   --debian       base localhost/debian:bookworm, made first if missing (debootstrap --variant=minbase; needs
#                  root and DEBIAN_MIRROR, default http://deb.debian.org/debian)
#   --tag TAG      the image's name (default proxygml:latest, or localhost/proxygml:debian with --debian)
#   --no-pip-config  do not lend the build this machine's pip configuration (see below)
#
# pip inside the build uses the same package sources as pip here: its settings (find-links, index URLs, a
# constraints file, a certificate bundle) become the Dockerfile's PIP_* build arguments, and the local folders
# and files they name are mounted read-only under /run/pip-build/ for the build only (launch/pip_sources.py), so
# a local wheel cache or mirror serves torch instead of a download; nothing of this machine stays in the image. The build prints its time and the image's size at the end.
# podman needs, on some hosts: PODMAN_OPTS="--runtime runc --cgroup-manager cgroupfs" and a containers.conf with
# `default_ulimits = []` in CONTAINERS_CONF (docs/clusters.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "build_image.sh: $*" >&2; exit 2; }
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit "${1:-0}"; }

base="" tag="" debian=0 pip_config=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --base) base="${2:?--base needs an image}"; shift 2 ;;
    --tag) tag="${2:?--tag needs a name}"; shift 2 ;;
    --debian) debian=1; shift ;;
    --no-pip-config) pip_config=0; shift ;;
    -h|--help) usage 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

if command -v podman >/dev/null; then
  # shellcheck disable=SC2206  # PODMAN_OPTS: options, split on purpose
  engine=(podman ${PODMAN_OPTS:-})
elif command -v docker >/dev/null; then
  engine=(docker)
else
  die "neither podman nor docker found (apt-get install podman)"
fi

if ((debian)); then
  base="${base:-localhost/debian:bookworm}"
  tag="${tag:-localhost/proxygml:debian}"
  if ! "${engine[@]}" image exists "$base" 2>/dev/null; then
    command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    echo "build_image.sh: making $base with debootstrap (about a minute)"
    debootstrap --variant=minbase bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
    tar -C "$rootfs" -c . | "${engine[@]}" import - "$base" >/dev/null
    rm -rf "$rootfs"
  fi
fi
tag="${tag:-proxygml:latest}"

build_args=()
[[ -n "$base" ]] && build_args+=(--build-arg "CUDA_IMAGE=$base")

mounts=()
if ((pip_config)) && command -v pip >/dev/null; then  # pip's sources here, for the build only (launch/pip_sources.py)
  while IFS=$'\t' read -r kind a b; do
    case "$kind" in
      mount) mounts+=(--volume "$a:$b:ro") ;;
      arg) build_args+=(--build-arg "$a=$b") ;;
    esac
  done < <(python3 "$ROOT/launch/pip_sources.py")
fi

if [[ "${engine[0]}" == docker && ${#mounts[@]} -gt 0 ]]; then
  echo "build_image.sh: docker build cannot mount folders: pip downloads what the image needs" >&2
  mounts=()
  build_args=(${base:+--build-arg "CUDA_IMAGE=$base"})
fi

echo "build_image.sh: ${engine[*]} build ${build_args[*]} -t $tag ($(( ${#mounts[@]} / 2 )) pip source(s) lent)"
start=$(date +%s)
"${engine[@]}" build --network host "${build_args[@]}" "${mounts[@]}" -t "$tag" "$ROOT"
took=$(( $(date +%s) - start ))
size="$("${engine[@]}" image inspect --format '{{.Size}}' "$tag")"
echo "build_image.sh: built $tag in ${took} s; size $(( size / 1000000 )) MB"
