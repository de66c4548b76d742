"""Run under `mpiexec -n 2` by test_mpi_comm.py: MPICommunicator collectives and GradReducer over real MPI.
Prints one 'OK rank R' line per rank; any mismatch raises (non-zero exit)."""
import numpy as np

from ndtrain.cluster.comm.mpi import MPICommunicator
from ndtrain.cluster.reducer import GradReducer
from ndtrain.engine import ParamStore, Sequential
from ndtrain.engine.layers import Linear

comm = MPICommunicator(chunk_bytes=4096)  # tiny chunks: the chunked path runs on small buffers
r, W = comm.rank, comm.world_size
assert W == 2, W

for n in (1, 7, 1024, 5000):  # below, at and above one chunk (1024 float32)
    for dtype in (np.float32, np.float64):
        x = np.arange(n, dtype=dtype) * (r + 1)
        comm.allreduce(x)
        np.testing.assert_array_equal(x, np.arange(n, dtype=dtype) * 3)
        y = (np.arange(n, dtype=dtype) + r).reshape(-1, 1) if n > 1 else np.full(1, r, dtype)
        h = comm.iallreduce(y)
        h.wait()
        np.testing.assert_array_equal(y.reshape(-1), 2 * np.arange(n, dtype=dtype) + 1)

b = np.full(3000, r, np.float64)
comm.broadcast(b, root=1)
assert np.all(b == 1)
assert comm.allgather_obj({"rank": r, "host": "h"}) == [{"rank": 0, "host": "h"}, {"rank": 1, "host": "h"}]
try:
    comm.allreduce(np.zeros((4, 4))[:, 1])
    raise AssertionError("non-contiguous buffer accepted")
except ValueError as e:
    assert "rank" in str(e)

# GradReducer over MPI: different data per rank; the result equals the sum of both ranks' plain gradients
model = Sequential(Linear(5, 64), Linear(64, 64), Linear(64, 3))
store = ParamStore.from_module(model, dtype=np.float64, seed=0)
rng = np.random.default_rng(r)
x = rng.standard_normal((4, 5))
y, backward = model(x)
backward(np.ones_like(y))
mine = store.grad.copy()
both = np.empty((2, store.size))
both[r] = mine
for k in range(2):
    comm.broadcast(both[k], root=k)
store.zero_grad()
reducer = GradReducer(comm, store, model, bucket_mb=0.01, overlap=True)
assert len(reducer.buckets) > 1
reducer.begin(sync=True)
y, backward = model(x)
backward(np.ones_like(y))
reducer.finish()
np.testing.assert_array_equal(store.grad, both[0] + both[1])
checks = comm.allgather_obj(store.grad.tobytes().hex()[:64])
assert checks[0] == checks[1]
comm.barrier()

# counters: a bandwidth-optimal all-reduce's bytes (estimated: MPI hides its algorithm), the time blocked measured
before = comm.counters.snapshot()
z = np.ones(1000, np.float32)
comm.allreduce(z)
comm.iallreduce(z).wait()
d = comm.counters.delta(comm.counters.snapshot(), before)
assert d["estimated"] is True and d["collectives"] == 2 and d["payload_bytes"] == 8000, d
assert d["bytes_sent"] == d["bytes_received"] == 2 * 4000, d  # 2 (W-1)/W x N per all-reduce, W = 2
assert d["blocked_s"] > 0, d
print(f"OK rank {r}", flush=True)
