#!/bin/bash
# The searches behind configs/embedded/{rotated,colored}_mnist/{udim,divdis,dbat,itta}.yaml
# (the other algorithms' configs come from benchmarks/domainbed_table.py). Each writes
# sweeps/configs/<data set>/<alias>/...; runs already there are skipped, so a stopped search
# resumes. Then, per search (its line for the configs' headers):
#   python benchmarks/embedded_configs.py sweeps/configs/rotated_mnist sweeps/configs/colored_mnist \
#       --algos udim --search "bash benchmarks/embedded_searches.sh udim (...)"
# (ITTA: sweeps/claims/itta for Rotated MNIST, the claim's runs, and sweeps/configs/colored_mnist.)
# Usage: bash benchmarks/embedded_searches.sh udim|diversify|itta ...  (on 2 CPU cores: UDIM's
# 54 runs about 12 min, DivDis' and D-BAT's 36 about 3 min, ITTA's colored runs the longest)
set -euo pipefail
COMMON=(--trainer.max_steps 300 --trainer.max_epochs 15 --trainer.val_check_interval 60
        --trainer.check_val_every_n_epoch null --data.track_test true
        --trainer.enable_progress_bar false --trainer.enable_model_summary false)
for what in "$@"; do
  case "$what" in
    udim)  # UDIM's two radii on a grid (the paper tunes both)
      for data in rotated_mnist colored_mnist; do
        dgkit sweep --dir "sweeps/configs/$data" --algos udim --test-domains all --seeds 0 \
          --grid model.algorithm.init_args.rho_x=0.1,1,10 model.algorithm.init_args.rho=0.01,0.05 \
          -- --data "$data" "${COMMON[@]}" --model.backbone mlp
      done ;;
    diversify)  # DivDis and D-BAT at their defaults, the held-out domains' unlabeled images as the pool
      for data in rotated_mnist colored_mnist; do
        dgkit sweep --dir "sweeps/configs/$data" --algos divdis dbat --test-domains all --random 1 \
          --trials 2 -- --data "$data" --data.unlabeled target "${COMMON[@]}" --model.backbone mlp
      done ;;
    itta)  # ITTA reads a backbone's stages: the MNIST CNN, 16 images per domain (second-order steps);
           # on Rotated MNIST the claim's runs (benchmarks/claims.py --claims itta_test_time) serve
      python benchmarks/claims.py --dir sweeps/claims --claims itta_test_time
      dgkit sweep --dir sweeps/configs/colored_mnist --algos itta --test-domains all --random 1 --trials 1 \
        -- --data colored_mnist --model.backbone mnist_cnn --data.batch_size 16 "${COMMON[@]}" ;;
    *) echo "embedded_searches.sh: unknown search '$what' (allowed: udim, diversify, itta)" >&2; exit 2 ;;
  esac
done
