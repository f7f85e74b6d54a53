#!/usr/bin/env bash
# The performance table in one command, with no download: random weights of the right architectures
# (google/ddpm-cifar10-32's UNet, 35.7M parameters) and the embedded digits stand in for CIFAR-10.
#
#   bash benchmarks/gpu.sh                        # on one GPU: under 10 minutes
#   bash benchmarks/gpu.sh --device cpu --small   # the same stages at toy sizes (tests/test_benchmarks.py runs it)
#
# Stages: single-step purification in fp32 and bf16 (img/s), ECLIPSE's 100-step reverse process, FRIENDS' fit
# overhead, certification models/hour (batched vs one at a time; small CNN and airbench), the fast recipe's models/hour at CIFAR size
# (fp32 and bf16; its accuracy needs CIFAR-10: benchmarks/fast_recipe.py), Lightning's overhead against a plain loop
# (ImageClassifier, and the floor: a bare LightningModule doing the plain loop's step).
set -euo pipefail
device=cuda
small=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --small) small=1; shift ;;
    *) echo "usage: $0 [--device cuda|cpu] [--small]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
py="${PYTHON:-python}"
accelerator=$([ "$device" = cpu ] && echo cpu || echo gpu)
if [ "$small" = 1 ]; then
  purify="--arch given --num-images 64 --batch-size 32 --repeats 1"
  eclipse="--arch given --num-images 16 --batch-size 16 --repeats 1 --timestep 4 --steps 4"
  friends="--epochs 2 --steps 1 --begin-epoch 1 --image-size 8 --width 4 --batch-size 64 --repeats 1"
  certify="--num_models 2 --models_per_batch 2 --image_size 8 --width 4 --max_epochs 1 --repeats 1"
  overhead="--epochs 1 --repeats 1"
  fast="--step-batch 16 --repeats 1"
else
  purify="--arch cifar --num-images 50000 --batch-size 512 --repeats 2"
  eclipse="--arch cifar --num-images 1024 --batch-size 512 --repeats 1 --timestep 100 --steps 100"
  friends="--epochs 20 --steps 20 --begin-epoch 5 --image-size 32 --width 32 --repeats 3"
  certify="--num_models 16 --models_per_batch 16 --image_size 32 --width 32 --max_epochs 2"
  overhead="--epochs 8 --repeats 5"
  fast="--repeats 20"
fi
echo "# device: $device ($(date -u +%Y-%m-%d)); small: $small"
echo "## single-step purification (Hong et al.), fp32"
$py benchmarks/purification_throughput.py $purify --device "$device" --precision 32
echo "## single-step purification, bf16 autocast"
$py benchmarks/purification_throughput.py $purify --device "$device" --precision bf16
echo "## ECLIPSE's reverse process from t*"
$py benchmarks/purification_throughput.py $eclipse --device "$device"
echo "## FRIENDS fit overhead"
$py benchmarks/friends_overhead.py $friends --accelerator "$accelerator"
echo "## certification: models per hour"
$py benchmarks/certify_throughput.py $certify --device "$device"
echo "## certification: models per hour, airbench94's network (widths w, 2w, 2w)"
$py benchmarks/certify_throughput.py $certify --device "$device" --backbone airbench --lr 2
echo "## certification: models per hour, airbench94's network and recipe (FastImageClassifier)"
$py benchmarks/certify_throughput.py $certify --device "$device" --backbone airbench --recipe fast --lr 0.8
echo "## the fast recipe (airbench94-style): models per hour at CIFAR size, against the ResNet-18 recipe"
$py benchmarks/fast_recipe.py --skip-fit $fast --device "$device"
$py benchmarks/fast_recipe.py --skip-fit $fast --device "$device" --precision bf16
echo "## Lightning overhead"
$py benchmarks/lightning_overhead.py $overhead --device "$device"
echo "## Lightning's floor: the plain loop's step as a bare LightningModule"
$py benchmarks/lightning_overhead.py $overhead --device "$device" --module bare
