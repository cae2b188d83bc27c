"""A minimal real worker for crash tests: appends each handled event_id to a file.

Usage: python record_ids.py BOOTSTRAP TOPIC GROUP OUT_FILE [HANDLE_DELAY_S]

The file is fsync'ed before the handler returns, so after a SIGKILL it holds exactly what
was handled; offsets are committed by the runtime only after that.
"""

from __future__ import annotations

import os
import sys
import time

from streaming.consumer import Failure, Message, StreamConsumer
from streamrec.contract import Event, parse_event
from streamrec.settings import Settings


def main() -> None:
    bootstrap, topic, group, out_path = sys.argv[1:5]
    delay = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
    settings = Settings(kafka_bootstrap=bootstrap, consumer_batch_size=500)
    out = open(out_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def handle(batch: list[Message[Event]]) -> list[Failure]:
        out.write("".join(f"{m.value.event_id}\n" for m in batch))
        out.flush()
        os.fsync(out.fileno())
        time.sleep(delay)
        return []

    consumer = StreamConsumer(settings, [topic], group, parse_event, handle)
    consumer.install_signal_handlers()
    print("ready", flush=True)
    stats = consumer.run()
    print(f"stopped handled={stats.handled} commits={stats.commits}", flush=True)


if __name__ == "__main__":
    main()
