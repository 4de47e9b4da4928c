"""SM partitioning for the pipeline's two sides on one GPU: CUDA green contexts (`cuGreenCtxCreate`).

`green_streams(device, attention_sms)` splits the device's SMs into a group of at least `attention_sms` for
the attention side and the rest for the FFN side, makes a green context over each and returns one stream in
each (as torch streams). Work queued on a stream runs only on its context's SMs, so the two sides of the
pipeline cannot take each other's SMs. Whether that beats two ordinary streams is what the pipeline's
benchmark measures (`crosspool.bench.multi_model`, mode `on-green`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crosspool.pools.vmm import check_cu


@dataclass
class GreenStreams:
    attention: torch.cuda.ExternalStream
    ffn: torch.cuda.ExternalStream
    sms: tuple[int, int]               # SMs of (attention, FFN) side
    contexts: tuple[object, object]    # the green contexts (kept alive with the streams)


def green_streams(device: torch.device, attention_sms: int) -> GreenStreams:
    from cuda.bindings import driver as cu

    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.init()
    dev = check_cu(cu.cuDeviceGet(index))
    sms = check_cu(cu.cuDeviceGetDevResource(dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    groups, _, rest = check_cu(cu.cuDevSmResourceSplitByCount(1, sms, 0, attention_sms))
    streams, contexts, counts = [], [], []
    for part in (groups[0], rest):
        desc = check_cu(cu.cuDevResourceGenerateDesc([part], 1))
        ctx = check_cu(cu.cuGreenCtxCreate(desc, dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
        stream = check_cu(cu.cuGreenCtxStreamCreate(ctx, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
        streams.append(torch.cuda.ExternalStream(int(stream), device=device))
        contexts.append(ctx)
        counts.append(int(part.sm.smCount))
    return GreenStreams(streams[0], streams[1], (counts[0], counts[1]), (contexts[0], contexts[1]))
