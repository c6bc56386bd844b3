#!/bin/bash
# bf16 vs fp32 on FEMNIST (LEAF sample), DISTREAL, fig5_femnist preset (tuned lr), 25 rounds, 3 seeds.
cd /work/main
for seed in 0 1 2; do
  for prec in fp32 bf16; do
    out=results/precision/${prec}_seed${seed}
    [ -f $out/metrics.csv ] && [ $(wc -l < $out/metrics.csv) -ge 26 ] && continue
    echo "$(date -u +%T) start $prec seed $seed"
    .venv/bin/python -m flwr_distreal.main +experiment=fig5_femnist method=distreal rounds=25 seed=$seed \
      precision=$prec layout=nchw plot=false output_dir=$out > results/precision/${prec}_seed${seed}.log 2>&1
    echo "$(date -u +%T) end $prec seed $seed rc=$?"
  done
done
