"""The embedded broker: kombu's filesystem transport, with whole messages only.

kombu's filesystem transport creates a message file under its final name and then writes into it; a consumer that
lists the queue folder in between takes the empty file, fails to parse it (``JSONDecodeError``), and the worker's
consumer dies with the message already removed — a run handed to the workers is never started (seen in CI: a study
stayed ``complete`` after a node restart). Here

* a message is written under a name no consumer matches (``.<name>.part``), flushed to disk, and renamed to its
  final name: a consumer sees a whole message or none;
* a consumer claims a message by renaming it into the processed folder (one rename wins; the others move on), and a
  message that does not parse (a torn write from a crash of an older node) is set aside in ``unreadable/`` with a
  logged event instead of killing the consumer. The database stays the record of every run: the node's watchdog
  dispatches again a run whose message was lost (:func:`workers.pipeline.stalled_runs`).
"""

from __future__ import annotations

import logging
import os
import uuid
from queue import Empty
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

from omnict_node.logs import log_event

log = logging.getLogger("omnict.broker")

PARTIAL_PREFIX = "."  # kombu matches ``<stamp>_<uuid>.<queue>.msg``: a leading dot never matches
UNREADABLE_FOLDER = "unreadable"


def _queue_of(filename: str) -> str:
    """``"<stamp>_<uuid>.cpu.msg"`` -> ``"cpu.msg"`` (kombu's own matching rule)."""
    return filename.partition(".")[2]


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload, **kwargs) -> None:
        """Write ``payload`` as one message file of ``queue``, visible to consumers only once it is whole."""
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = os.path.join(self.data_folder_out, PARTIAL_PREFIX + name + ".part")
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
                handle.flush()
                os.fsync(handle.fileno())  # a crash after the rename leaves a whole file, not an empty one
            os.replace(partial, final)
        except OSError as exc:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise ChannelError(f"cannot add a message to {self.data_folder_out!r}") from exc

    def _get(self, queue: str):
        """Take the oldest whole message of ``queue``; raises ``Empty`` when there is none."""
        wanted = f"{queue}.msg"
        for filename in sorted(os.listdir(self.data_folder_in)):
            if _queue_of(filename) != wanted:
                continue
            claimed = os.path.join(self.processed_folder, filename)
            try:
                os.rename(os.path.join(self.data_folder_in, filename), claimed)
            except FileNotFoundError:  # another consumer took it
                continue
            except OSError as exc:
                raise ChannelError(f"cannot take message {filename!r} from the queue") from exc
            with open(claimed, "rb") as handle:
                payload = handle.read()
            try:
                message = loads(bytes_to_str(payload))
            except ValueError:
                self._set_aside(claimed, filename, len(payload))
                continue
            if not self.store_processed:
                os.unlink(claimed)
            return message
        raise Empty()

    def _set_aside(self, path: str, filename: str, size: int) -> None:
        folder = os.path.join(os.path.dirname(self.data_folder_in.rstrip(os.sep)), UNREADABLE_FOLDER)
        os.makedirs(folder, exist_ok=True)
        os.replace(path, os.path.join(folder, filename))
        log_event(log, "broker.message.unreadable", logging.ERROR, message=filename, bytes=size, kept_in=folder)


class Transport(filesystem.Transport):
    """Celery's ``broker_transport`` for the embedded broker (``workers.broker:Transport``)."""

    Channel = Channel
