"""Run under `torchrun --nproc_per_node 2`: each rank seeds its random stream differently, then trains a
quantizer step whose dead codes must restart; prints whether every rank ends with rank 0's codebook."""

import sys

import torch
import torch.distributed as dist

from neuroar import distributed
from neuroar.models.quantizer import MultiScaleQuantizer

ctx = distributed.init()
torch.manual_seed(0)
quantizer = MultiScaleQuantizer(codebook_size=32, dim=4, scales=((1, 1, 1), (2, 2, 2)), usage_decay=0.0,
                                dead_usage=0.5).train()
if sys.argv[1:] == ["connect"]:
    quantizer.connect(ctx.gather_batch, ctx.broadcast)
torch.manual_seed(1 + ctx.rank)  # the ranks' streams diverge, as after any rank-local random draw
features = torch.randn(8, 4, 2, 2, 2)[ctx.rank::ctx.world]
quantizer(features)  # initialises from the batch, then restarts the codes the batch did not use
codebooks = [torch.empty_like(quantizer.codebook.weight) for _ in range(ctx.world)]
dist.all_gather(codebooks, quantizer.codebook.weight.detach().contiguous())
if ctx.main:
    print("same" if all(torch.equal(codebooks[0], c) for c in codebooks) else "different")
dist.barrier()
dist.destroy_process_group()  # a process that exits with its group open may abort in gloo's teardown
