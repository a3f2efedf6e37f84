"""The count of images the stream skipped (undecodable, unreadable, lost with a damaged
shard), exact whatever batch they would have fallen in, with the images it decoded and the
seconds its decode tasks spent on them (for the decode rate per CPU in each epoch's line).

Rows cannot carry it: the last partial batch of an epoch is dropped, an equal split drops
rows, and a lost shard yields no rows at all. So each read task adds its count to one
counter actor per Ray job before it hands over its last block, and rank 0 takes the count
when its epoch's iterator is exhausted: by then every read task of that execution has
finished, and the next execution starts only when every worker asks for it (streaming_split
waits for all splits), which rank 0 does after taking the count.
"""
import ray

from pipelines.console import job_actor


@ray.remote(num_cpus=0)
class SkipCounter:
    def __init__(self):
        self.counts = {"skipped": 0, "decoded": 0, "decode_seconds": 0.0}

    def add(self, skipped: int, decoded: int = 0, seconds: float = 0.0) -> None:
        self.counts["skipped"] += skipped
        self.counts["decoded"] += decoded
        self.counts["decode_seconds"] += seconds

    def take(self) -> dict:
        """The counts since the last take, reset to 0."""
        counts, self.counts = self.counts, {"skipped": 0, "decoded": 0, "decode_seconds": 0.0}
        return counts


def skip_counter():
    """This Ray job's counter (created by the first caller: the driver, in `image_stream`)."""
    return job_actor(SkipCounter, "mae-skipped-images")
