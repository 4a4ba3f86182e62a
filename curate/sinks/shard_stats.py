"""``shard_stats/NNNNN_stats.json``: img2dataset's per-shard stats, so its users' scripts keep working.

The fields are img2dataset's (``count``, ``successes``, ``failed_to_download``,
``failed_to_resize``, ``duration``, ``start_time``, ``end_time``, ``status_dict``),
computed from the shard's ledger: a download reason that means "arrived, but no
usable image" counts as ``failed_to_resize``, every other download reason as
``failed_to_download``. Written beside, not inside, ``ledger/`` so that folder
stays pure Parquet.
"""

from __future__ import annotations

import time

from curate.fsutil import write_json
from curate.net.image import FAILED_TO_RESIZE
from curate.sinks.base import ShardRows, ShardWrite, Sink

#: The stage whose reasons img2dataset's two failure counters split.
DOWNLOAD_STAGE = "download"


class ShardStatsSink(Sink):
    name = "shard_stats"

    def write(self, shard: ShardRows) -> ShardWrite:
        n_kept = shard.kept.num_rows
        status_dict = {"success": n_kept} if n_kept else {}
        failed_download = failed_resize = 0
        for by, reasons in shard.dropped.items():
            for reason, n in reasons.items():
                status_dict[reason] = status_dict.get(reason, 0) + n
                if by == DOWNLOAD_STAGE:
                    if reason in FAILED_TO_RESIZE or reason.startswith(("image_", "decode", "resize")):
                        failed_resize += n
                    else:
                        failed_download += n
        now = time.time()
        write_json(f"{self.ctx.root}/shard_stats/{shard.name}_stats.json", {
            "count": shard.table.num_rows, "successes": n_kept, "failed_to_download": failed_download,
            "failed_to_resize": failed_resize, "duration": now - self.ctx.started,
            "start_time": self.ctx.started, "end_time": now, "status_dict": status_dict,
        })
        return ShardWrite()
