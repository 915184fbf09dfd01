#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, install scaleattn on every worker, run on all workers at once
# (JAX finds the other workers by itself), then copy the workdir of worker 0 back.
#
#   ZONE=us-central2-b TPU_NAME=scaleattn ACCELERATOR=v4-32 \
#     launch/tpu_vm.sh configs/voc.py gs://my-bucket/runs/voc "--config.dataset.data_dir=gs://my-bucket/tfds"
#
# The code the workers run: this checkout (its committed HEAD, copied to every worker), or REPO=<git URL> to clone
# that instead. Any global batch runs on any number of chips (padded to the chip count), so configs/voc.py starts
# unchanged on v4-8 (4 chips), v4-32 (16) and larger slices.
# WORKDIR must be gs:// (on pod slices every worker must see the same checkpoint directory) or an absolute path:
# the code folder on the workers is replaced at every launch, the workdir never is, so a rerun resumes.
set -euo pipefail

CONFIG=${1:?usage: tpu_vm.sh CONFIG WORKDIR [EXTRA_FLAGS]}
WORKDIR=${2:?usage: tpu_vm.sh CONFIG WORKDIR [EXTRA_FLAGS]}
EXTRA=${3:-}
ZONE=${ZONE:?set ZONE}
TPU_NAME=${TPU_NAME:-scaleattn}
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
REPO=${REPO:-}
LOCAL_RESULTS=${LOCAL_RESULTS:-results/${TPU_NAME}}
case "${WORKDIR}" in
  gs://*|/*) ;;
  *) echo "tpu_vm.sh: WORKDIR=${WORKDIR}: expected a gs:// or absolute path (the code folder is replaced at every launch)" >&2
     exit 2 ;;
esac

tpu() { gcloud compute tpus tpu-vm "$@" --zone="${ZONE}"; }

if ! tpu describe "${TPU_NAME}" >/dev/null 2>&1; then
  tpu create "${TPU_NAME}" --accelerator-type="${ACCELERATOR}" --version="${RUNTIME}"
fi

if [ -n "${REPO}" ]; then
  FETCH="rm -rf scaleattn_src && git clone ${REPO} scaleattn_src"
else
  ARCHIVE=$(mktemp --suffix=.tar.gz)
  git -C "$(dirname "$0")/.." archive --format=tar.gz --prefix=scaleattn_src/ -o "${ARCHIVE}" HEAD
  tpu scp --worker=all "${ARCHIVE}" "${TPU_NAME}:scaleattn_src.tar.gz"
  rm -f "${ARCHIVE}"
  FETCH="rm -rf scaleattn_src && tar xzf scaleattn_src.tar.gz"
fi

tpu ssh "${TPU_NAME}" --worker=all --command "
  set -e
  ${FETCH}
  [ -d scaleattn_venv ] || python3 -m venv scaleattn_venv
  . scaleattn_venv/bin/activate
  cd scaleattn_src && pip install -q -c constraints.txt -e '.[tpu]'
"

tpu ssh "${TPU_NAME}" --worker=all --command "
  . scaleattn_venv/bin/activate && cd scaleattn_src
  python -m scaleattn.main --config=${CONFIG} --workdir=${WORKDIR} ${EXTRA}
"

mkdir -p "${LOCAL_RESULTS}"
case "${WORKDIR}" in
  gs://*) gsutil -m cp -r "${WORKDIR}" "${LOCAL_RESULTS}/" ;;
  *) tpu scp --worker=0 --recurse "${TPU_NAME}:${WORKDIR}" "${LOCAL_RESULTS}/" ;;
esac
echo "Results in ${LOCAL_RESULTS}. Delete the TPU with: gcloud compute tpus tpu-vm delete ${TPU_NAME} --zone=${ZONE}"
