"""Per-step aggregation of the ranks' metrics records (pure; the coordinator feeds it).

Records of one step and kind (train, or eval when the record has an "eval" key) from every reporting rank become
one record:
  loss_sum, count, tokens, samples   summed; loss = sum(loss_sum) / sum(count) (the mean over ALL tokens)
  step_time                          max over ranks (the slowest rank sets the pace); rank_step_s: each rank's
                                     {"0": s0, "1": s1, ...}
  comm_time                          mean over ranks; comm_share = mean over ranks of comm_time / step_time
  tokens_per_s, samples_per_s        sum over ranks of tokens / step_time (the job's throughput)
  reporting_ranks                    how many ranks' records were aggregated (1 when only rank 0 reports)
  anything else                      the lowest rank's value (lr, grad_norm, eval dicts, time)
"""
from __future__ import annotations

SUMMED = ("loss_sum", "count", "tokens", "samples")


def aggregate(by_rank: dict[int, dict]) -> dict:
    """by_rank: rank -> record of the same step. Returns the job's record for that step."""
    ranks = sorted(by_rank)
    out: dict = {}
    for r in reversed(ranks):  # lowest rank wins for pass-through keys
        out.update(by_rank[r])
    recs = [by_rank[r] for r in ranks]
    for key in SUMMED:
        vals = [rec[key] for rec in recs if _num(rec.get(key))]
        if vals:
            out[key] = sum(vals)
    if _num(out.get("loss_sum")) and _num(out.get("count")) and "loss_sum" in recs[0]:
        out["loss"] = out["loss_sum"] / out["count"] if out["count"] else float("nan")
    times = [rec["step_time"] for rec in recs if _num(rec.get("step_time"))]
    if times:
        out["step_time"] = max(times)
        out["rank_step_s"] = {str(r): by_rank[r]["step_time"] for r in ranks if _num(by_rank[r].get("step_time"))}
    comm = [rec["comm_time"] for rec in recs if _num(rec.get("comm_time"))]
    if comm:
        out["comm_time"] = sum(comm) / len(comm)
        shares = [rec["comm_time"] / rec["step_time"] for rec in recs
                  if _num(rec.get("comm_time")) and _num(rec.get("step_time")) and rec["step_time"] > 0]
        if shares:
            out["comm_share"] = sum(shares) / len(shares)
    for key, per in (("tokens", "tokens_per_s"), ("samples", "samples_per_s")):
        rates = [rec[key] / rec["step_time"] for rec in recs
                 if _num(rec.get(key)) and _num(rec.get("step_time")) and rec["step_time"] > 0]
        if rates:
            out[per] = sum(rates)
    out["reporting_ranks"] = len(recs)  # whose records were aggregated (rank 0 only, when only it reports)
    return out


def with_rank_timing(rec: dict, rank_timing: dict[int, dict], world_size: int) -> dict:
    """Add rank_step_s {"0": s, ...} and rank_comm_share (share of the step blocked in collectives) to a train
    record, in place, from each rank's latest timing {"step_s", "comm_s"} (the coordinator's timing messages: one
    measurement, time between step starts, for every rank). A record aggregated from every rank's record of this
    step already has an exact rank_step_s: it is kept. Sets comm_share (mean over ranks) when the record has none."""
    per = dict(rec.get("rank_step_s") or {})
    complete = len(per) >= world_size
    share = {}
    for r, t in sorted(rank_timing.items()):
        step_s, comm_s = t.get("step_s"), t.get("comm_s")
        if not _num(step_s) or step_s <= 0:
            continue
        if not complete:
            per[str(r)] = step_s
        if _num(comm_s):
            share[str(r)] = comm_s / step_s
    if per:
        rec["rank_step_s"] = dict(sorted(per.items(), key=lambda kv: int(kv[0])))
    if share:
        rec["rank_comm_share"] = share
        if "comm_share" not in rec:
            rec["comm_share"] = sum(share.values()) / len(share)
    return rec


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class StepAggregator:
    """Collects records until every reporting rank has sent the step, then yields the aggregate (in step order
    of completion). flush_all() yields whatever is incomplete (a job that ended early), marked partial."""

    def __init__(self, reporting_ranks: list[int]):
        self.reporting = set(reporting_ranks)
        self._groups: dict[tuple[str, int], dict[int, dict]] = {}

    def add(self, rank: int, record: dict) -> list[dict]:
        key = ("eval" if "eval" in record else "train", int(record["step"]))
        group = self._groups.setdefault(key, {})
        group[rank] = record
        if self.reporting <= set(group):
            del self._groups[key]
            return [aggregate(group)]
        return []

    def flush_all(self) -> list[dict]:
        out = []
        for key in sorted(self._groups, key=lambda k: (k[1], k[0])):
            rec = aggregate(self._groups[key])
            rec["partial"] = True
            out.append(rec)
        self._groups.clear()
        return out
