#!/usr/bin/env bash
# Build the brainmt Apptainer image from Apptainer.def and report its size and the build time.
#
#   containers/build.sh [--arch 8.0,9.0] [--max-jobs N] [--output PATH] [--force] [-- APPTAINER BUILD OPTIONS]
#
#   --arch      CUDA architectures the Mamba kernels are compiled for, as in TORCH_CUDA_ARCH_LIST
#               (default 8.0,9.0: A100 and H100/H200; add 10.0 for B200, 8.0 also serves A40/A10/L40 GPUs)
#   --max-jobs  parallel nvcc jobs (default: the cores, at most one per 4 GB of available memory)
#   --output    the image (default containers/brainmt.sif); --force replaces an existing one
#   after --    passed to `apptainer build`, e.g. --notest on a node where %test cannot run
#
# Run it on a login or build node with Apptainer >= 1.2 (or SingularityCE >= 4: BRAINMT_CONTAINER_RUNTIME=singularity)
# and about 40 GB free in APPTAINER_TMPDIR (else TMPDIR, else /tmp). Without root it builds with --fakeroot.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
arch=8.0,9.0
max_jobs=""
output=$root/containers/brainmt.sif
force=()
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch=$2; shift 2 ;;
        --max-jobs) max_jobs=$2; shift 2 ;;
        --output) output=$2; shift 2 ;;
        --force) force=(--force); shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "build.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$output" in /*) ;; *) output=$PWD/$output ;; esac

runtime=${BRAINMT_CONTAINER_RUNTIME:-apptainer}
if ! command -v "$runtime" >/dev/null 2>&1; then
    echo "build.sh: $runtime not found: load it (e.g. module load apptainer) or set BRAINMT_CONTAINER_RUNTIME" >&2
    exit 127
fi
version_line=$("$runtime" --version)
version=$(printf '%s\n' "$version_line" | grep -o '[0-9][0-9]*\.[0-9][0-9]*' | head -n 1)
major=${version%%.*}
minor=${version#*.}
case "$version_line" in
    *apptainer*) needed="1.2"; too_old=$(( major < 1 || (major == 1 && minor < 2) )) ;;
    *singularity*) needed="4.0"; too_old=$(( major < 4 )) ;;
    *) needed=""; too_old=0 ;;
esac
if [ "$too_old" = 1 ]; then
    echo "build.sh: $version_line is too old: build arguments (%arguments, --build-arg) need $needed or later" >&2
    exit 2
fi

if [ -z "$max_jobs" ]; then
    cores=$(nproc)
    mem_gb=$(awk '/^MemAvailable:/ {print int($2 / 1048576)}' /proc/meminfo)
    max_jobs=$(( mem_gb / 4 < cores ? mem_gb / 4 : cores ))
    [ "$max_jobs" -ge 1 ] || max_jobs=1
fi
if [ -e "$output" ] && [ ${#force[@]} -eq 0 ]; then
    echo "build.sh: $output exists; pass --force to replace it" >&2
    exit 2
fi
fakeroot=()
[ "$(id -u)" -eq 0 ] || fakeroot=(--fakeroot)

tmp=${APPTAINER_TMPDIR:-${TMPDIR:-/tmp}}
free_gb=$(df -Pk "$tmp" | awk 'NR == 2 {print int($4 / 1048576)}')
if [ "$free_gb" -lt 40 ]; then
    echo "build.sh: warning: $free_gb GB free in $tmp; the build needs about 40 GB (set APPTAINER_TMPDIR)" >&2
fi

mkdir -p "$(dirname "$output")"
cd "$root"   # Apptainer.def's %files paths are relative to the repository root
echo "build.sh: $output from Apptainer.def: CUDA architectures $arch, $max_jobs parallel nvcc jobs, $version_line"
start=$(date +%s)
"$runtime" build ${fakeroot[@]+"${fakeroot[@]}"} ${force[@]+"${force[@]}"} --build-arg "cuda_arch=$arch" \
    --build-arg "max_jobs=$max_jobs" ${extra[@]+"${extra[@]}"} "$output" Apptainer.def
elapsed=$(( $(date +%s) - start ))
size=$(du -k "$output" | cut -f1)
printf 'build.sh: built %s: %d MiB in %dm%02ds\n' "$output" $(( size / 1024 )) $(( elapsed / 60 )) $(( elapsed % 60 ))
