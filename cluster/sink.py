"""Where a rank's records go: the sink interface the trainer logs to.

Local runs write the run directory through launch.rundir.RunWriter (inside a launch.progress.TeeSink with the console
and TensorBoard); distributed ranks send to the coordinator (cluster.metrics_channel.RankReporter), which hands the
aggregated records to the sinks the launcher gave it. Optional methods, used when a sink has them:
progress(step) before every step (heartbeats, the progress bar) and notice(message) for one-off messages.
"""
from __future__ import annotations


class MetricsSink:
    def log(self, record: dict) -> None:
        raise NotImplementedError

    def summary(self, summary: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NullSink(MetricsSink):
    """For ranks that do not report (another rank or the coordinator writes the run directory)."""

    def log(self, record: dict) -> None:
        pass

    def summary(self, summary: dict) -> None:
        pass
