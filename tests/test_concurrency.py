"""One compressed model shared by several Python threads (a server answering requests at once): each thread's
`generate` gives what it gives alone. The kernels keep per-thread work buffers; a buffer shared by mistake, or a
rebuilt weight cached across calls, would mix one request's numbers into another's."""

import threading

import pytest
import torch

from optimum_lrs import LowRankSparseConfig, compress_

from .conftest import tiny_llama

THREADS = 8


@pytest.mark.parametrize("quantization", [None, {"bits": 4, "group_size": 32}], ids=["float", "4-bit"])
def test_eight_threads_generate_what_one_thread_generates(quantization):
    calibration = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    model = compress_(tiny_llama(), LowRankSparseConfig(param_ratio=0.5, calibration_data=calibration,
                                                        quantization=quantization))
    g = torch.Generator().manual_seed(1)
    # prompts of different lengths, so that threads run the few-token kernels and the longer paths at once
    prompts = [torch.randint(0, 256, (1 + i % 3, 4 + 5 * i), generator=g) for i in range(THREADS)]

    def generate(ids):
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)

    alone = [generate(ids) for ids in prompts]
    together, errors = [None] * THREADS, []
    barrier = threading.Barrier(THREADS)

    def worker(i):
        try:
            barrier.wait()
            for _ in range(3):  # several rounds, so that the threads' calls interleave
                out = generate(prompts[i])
                if together[i] is not None and not torch.equal(out, together[i]):
                    raise AssertionError(f"thread {i}: rounds disagree")
                together[i] = out
        except Exception as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert all(torch.equal(a, b) for a, b in zip(alone, together)), [i for i, (a, b) in enumerate(zip(alone, together))
                                                                     if not torch.equal(a, b)]
