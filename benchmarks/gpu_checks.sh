#!/usr/bin/env bash
# The GPU checks in one run of about ten minutes: CUDA and bf16, ResNet-50 steps (ERM, SAM,
# torch.compile, peak memory, against a bare loop), the loader at 224 px, the loop's fixed
# cost at GPU step sizes, `dgkit fit` on the GPU in bf16, and the pinned loss copy. Every
# figure it prints goes to docs/benchmarks.md with the date and the device.
#
# Run from the repository root with dgkit installed (`pip install -e .`). Where the machine
# cannot reach PyPI, carry the wheels that its image lacks (jsonargparse, albumentations and
# what they need, wilds) in .whl/ and install with `pip install --no-index --find-links .whl -e .`.
set -u
step() { echo; echo "\$ $*"; timeout "$LIMIT" "$@" 2>&1 | grep -v -e "^Seed set" -e "LOCAL_RANK" -e "max_steps=" ; }

nvidia-smi -L
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported())"
LIMIT=240 step python benchmarks/gpu_resnet50.py
LIMIT=120 step python benchmarks/loader.py --workers 0 4 8 --backbone resnet50 --batches 20 --steps 10
LIMIT=150 step python benchmarks/loop_overhead.py --accelerator gpu --rounds 1 --steps 100 --sizes mlp:2 mnist_cnn:8 mnist_cnn:64
LIMIT=90 step dgkit fit --trainer.accelerator gpu --trainer.precision bf16-mixed --trainer.max_steps 100 \
    --trainer.enable_progress_bar false --trainer.default_root_dir /tmp/gpu_fit
# The lagged loss copy (dgkit/host_scalar.py) through pinned memory, which only CUDA has.
LIMIT=60 step python -m pytest -q -p no:cacheprovider tests/test_host_scalar.py
