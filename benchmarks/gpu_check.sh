#!/usr/bin/env bash
# Everything a lent GPU session needs for the large-batch loss (issue 6), in one device call
# (a fresh machine costs minutes of the session's 30; few full calls cost less than many):
#
#   1. the GPU tests of the kernels, the losses and the training batches' index copy,
#   2. benchmarks/loss.py at D = 1024, bf16, N = 4k..65k: dense, Triton and Inf-CL in one run,
#   3. if .ref/ holds an older tree (`mkdir .ref && git archive REV src benchmarks | tar -x -C .ref`,
#      carried as `.ref`), the same Triton timings of that tree and of this one again, on the same
#      card: an A/B within one lease (each benchmark script imports its own tree's src),
#   4. the torch.profiler table of one 65k step, and its launch gaps (benchmarks/launch_gaps.py),
#   5. (step "tune") benchmarks/tune_tiles.py at 65k: rows 17 and 21 by default (row 17 = the
#      defaults; 21 = the same with the mirrored diagonal block of the X X^T / Y Y^T strips, off by
#      default since e39814d's profile); TUNE_ROWS="12,17" picks other rows.
#   6. (step "sums") benchmarks/partial_sums.py at 65k: the per-tile partial sums through torch and
#      through the (not yet timed) Triton reduction, per buffer shape and over whole steps.
#
# From the repository root on the device machine: `bash benchmarks/gpu_check.sh`, or a subset:
# `STEPS="bench ab" bash benchmarks/gpu_check.sh` (steps: tests bench ab profile tune sums). The timeouts add
# up to more than the device's 10 minutes a call: run `STEPS=tests` and then
# `STEPS="bench ab profile"` (and `STEPS=tune`) as separate calls, back to back while the machine is warm. Results go to $OUT (the device tool's folder), else
# /tmp/gpu_check. Inf-CL comes from .whl/ when carried
# (`pip download --no-deps -d .whl inf-cl==1.2.1` here; the device has no network).
#
# Timed last on e39814d (docs/BENCHMARKS.md, "Mirroring profiled"): 114.1 ms at 65k against
# cc180f1's 110.9 ms in the same call; mirroring has been off by default since, untimed. Next:
# `rm -rf .ref && mkdir .ref && git archive cc180f1 src benchmarks | tar -x -C .ref`, then
# `STEPS="bench ab profile"` with carry [".ref", ".whl"], then `STEPS="tune sums"`.
set -u
STEPS=${STEPS:-tests bench ab profile}
has() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
SITE=/tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
    pip install -q --no-deps --target "$SITE" .whl/*.whl >/dev/null 2>&1 || echo "Inf-CL wheel did not install"
fi
export PYTHONPATH="src:$SITE"
{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if has tests; then
    echo "== tests"
    timeout 420 python -m pytest -q -p no:cacheprovider tests/kernels tests/losses tests/train/test_train_batches.py \
        >"$OUT/tests.txt" 2>&1
    tail -n 4 "$OUT/tests.txt"
fi

if has bench; then
    echo "== loss benchmark"
    timeout 230 python benchmarks/loss.py --device cuda --dim 1024 --sizes 4096,16384,32768,65536 --dtypes bf16 \
        --impls dense,triton,infcl --repeats 3 --json "$OUT/loss.json" >"$OUT/loss.txt" 2>&1
    grep -v Warning "$OUT/loss.txt" | tail -n 20
fi

if has ab && [ -f .ref/benchmarks/loss.py ]; then
    echo "== the same Triton timings of .ref, then of this tree again"
    for tree in .ref .; do
        echo "-- $tree"
        timeout 60 python "$tree/benchmarks/loss.py" --device cuda --dim 1024 --sizes 32768,65536 \
            --dtypes bf16 --impls triton --repeats 5 2>&1 | grep -v Warning | tail -n 4
    done | tee "$OUT/ab.txt"
fi

if has profile; then
    echo "== profile at 65k"
    timeout 60 python benchmarks/profile_loss.py --n 65536 --rows 16 >"$OUT/profile.txt" 2>&1
    grep -v Warning "$OUT/profile.txt" | head -n 24
    timeout 60 python benchmarks/launch_gaps.py --n 65536 --gaps 8 >"$OUT/gaps.txt" 2>&1
    grep -v Warning "$OUT/gaps.txt" | grep -E "step|kernels|^gap" | head -n 12
fi

if has tune; then
    echo "== tile candidates at 65k"
    timeout 300 python benchmarks/tune_tiles.py --n 65536 --only ${TUNE_ROWS:-17,21} --repeats 5 --profile \
        >"$OUT/tune.txt" 2>&1
    grep -v Warning "$OUT/tune.txt" | tail -n 20
fi

if has sums; then
    echo "== partial sums at 65k"
    timeout 120 python benchmarks/partial_sums.py --n 65536 >"$OUT/sums.txt" 2>&1
    grep -v Warning "$OUT/sums.txt" | tail -n 14
fi
