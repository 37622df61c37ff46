#!/usr/bin/env bash
# Run one brainmt command in the image:
#   apptainer exec --nv [--bind B]... IMAGE python3 -m brainmt.cli ARGS...
# the command line that jobs/launch.py --container runs for each task (brainmt.launch.container.exec_command).
#
#   containers/exec.sh [--image IMAGE] [--bind SRC[:DST[:OPTS]]]... [--profile site.yaml] [--no-nv] [--] ARGS...
#
#   --image    default $BRAINMT_IMAGE, else containers/brainmt.sif (where containers/build.sh writes it)
#   --bind     repeatable; $BRAINMT_BINDS (comma-separated) adds more, and --profile adds the cluster
#              profile's cluster.binds (read by brainmt inside the image: the host needs no Python packages)
#   --no-nv    without the host's GPU libraries (by default --nv, which only warns on a node without GPUs)
#   BRAINMT_CONTAINER_RUNTIME  apptainer (default) or singularity
#
# Example, in an sbatch script:  containers/exec.sh --profile site.yaml -- info --config paper
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
image=${BRAINMT_IMAGE:-$here/brainmt.sif}
runtime=${BRAINMT_CONTAINER_RUNTIME:-apptainer}
nv=(--nv)
binds=()
profile=""
IFS=',' read -r -a env_binds <<< "${BRAINMT_BINDS:-}"
for bind in ${env_binds[@]+"${env_binds[@]}"}; do
    [ -z "$bind" ] || binds+=("$bind")
done
while [ $# -gt 0 ]; do
    case "$1" in
        --image) image=$2; shift 2 ;;
        --bind) binds+=("$2"); shift 2 ;;
        --profile) profile=$2; shift 2 ;;
        --no-nv) nv=(); shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; break ;;
        *) break ;;
    esac
done
if [ $# -eq 0 ]; then
    echo "exec.sh: no brainmt command given (see --help)" >&2
    exit 2
fi
if [ ! -e "$image" ]; then
    echo "exec.sh: image $image not found: build it with containers/build.sh, or pass --image / set BRAINMT_IMAGE" >&2
    exit 2
fi
if [ -n "$profile" ]; then
    if [ ! -f "$profile" ]; then
        echo "exec.sh: profile $profile not found" >&2
        exit 2
    fi
    profile_dir=$(cd "$(dirname "$profile")" && pwd)
    profile_binds=$("$runtime" exec --bind "$profile_dir" "$image" python3 -m brainmt.launch.container \
        --print-binds "$profile_dir/$(basename "$profile")")
    while IFS= read -r bind; do
        [ -z "$bind" ] || binds+=("$bind")
    done <<< "$profile_binds"
fi

cmd=("$runtime" exec ${nv[@]+"${nv[@]}"})
for bind in ${binds[@]+"${binds[@]}"}; do
    cmd+=(--bind "$bind")
done
exec "${cmd[@]}" "$image" python3 -m brainmt.cli "$@"
