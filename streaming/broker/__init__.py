"""A real single-node Apache Kafka broker (KRaft mode) for laptops, the demo and the tests.

The jars come from Maven Central: ``pom.xml`` beside this file is resolved with the
user's ``mvn`` into ``<cache_dir>/kafka-<version>/libs`` once and reused by every run.
Storage is formatted on the first start; the broker listens on 127.0.0.1 only and logs
to ``<home>/broker.log``. Readiness is a real metadata request, not a port probe.

Examples
--------
::

    broker = LocalKafka(home=Path(".streamrec/kafka"), port=9092, controller_port=9093)
    broker.start()              # returns once a metadata request succeeds
    broker.bootstrap            # '127.0.0.1:9092'
    broker.stop()
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from base64 import urlsafe_b64encode
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamrec.settings import Settings

log = logging.getLogger(__name__)

POM = Path(str(files(__package__).joinpath("pom.xml")))
KAFKA_VERSION = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text()).group(1)  # type: ignore[union-attr]


class BrokerError(RuntimeError):
    """The local broker could not be provisioned, started or reached."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_jars(cache_dir: Path, *, quiet: bool = False) -> Path:
    """Resolve the broker's jars with Maven into the cache (once); return the libs folder."""
    libs = cache_dir / f"kafka-{KAFKA_VERSION}" / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("Maven ('mvn') is needed once to fetch the Kafka jars; put it on PATH")
    if not quiet:
        print(f"Fetching Apache Kafka {KAFKA_VERSION} jars with Maven into {libs} …", flush=True)
    tmp = libs.with_name(f"libs.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        mvn,
        "-B",
        "-q",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={tmp}",
        "-DincludeScope=runtime",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BrokerError(f"Maven could not resolve the Kafka jars:\n{proc.stdout}\n{proc.stderr}")
    (tmp / ".complete").write_text(KAFKA_VERSION)
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)  # atomic: a half-copied folder is never taken for a complete one
    return libs


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise BrokerError("a JDK 17+ ('java') is needed to run the local Kafka broker")
    return java


def broker_answers(bootstrap: str, timeout_s: float = 3.0) -> bool:
    """True when a Kafka metadata request to ``bootstrap`` succeeds."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap.split(","),
            request_timeout_ms=int(timeout_s * 1000),
            bootstrap_timeout_ms=int(timeout_s * 1000),
            client_id="streamrec-probe",
        )
    except (KafkaError, OSError, ValueError):
        return False
    try:
        admin.describe_cluster()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


_SERVER_PROPERTIES = """\
# Written by streamrec; single-node KRaft broker + controller on loopback.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={data}
num.partitions={partitions}
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=168
"""


@dataclass
class LocalKafka:
    """One local broker, identified by its home folder (data, config, log and pid file)."""

    home: Path
    port: int = 9092
    controller_port: int = 9093
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "streamrec")
    heap: str = "512m"
    partitions: int = 4

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalKafka:
        """The broker ``streamrec kafka up`` manages, as configured."""
        return cls(
            home=settings.kafka_home,
            port=settings.kafka_local_port,
            controller_port=settings.kafka_local_controller_port,
            cache_dir=settings.cache_dir,
            heap=settings.kafka_local_heap,
            partitions=settings.topic_partitions,
        )

    @classmethod
    def on_free_ports(cls, home: Path, **options: Any) -> LocalKafka:
        """A throwaway broker (tests, benchmarks) on ports nothing else uses."""
        return cls(home=home, port=free_port(), controller_port=free_port(), **options)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.home / "broker.log"

    @property
    def _pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def _config(self) -> Path:
        return self.home / "server.properties"

    @property
    def _data(self) -> Path:
        return self.home / "data"

    def pid(self) -> int | None:
        """PID of the running broker started from this home, if any."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def is_ready(self, timeout_s: float = 3.0) -> bool:
        return broker_answers(self.bootstrap, timeout_s)

    def start(self, *, timeout_s: float = 90.0, quiet: bool = False) -> None:
        """Provision, format (first time) and start the broker; wait until it answers."""
        if self.pid() is not None:
            if self.is_ready():
                return
            raise BrokerError(
                f"a broker process (pid {self.pid()}) from {self.home} runs but does not "
                f"answer on {self.bootstrap}; see {self.log_file} or run 'streamrec kafka down'"
            )
        for p in (self.port, self.controller_port):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", p)) == 0:
                    raise BrokerError(f"port {p} is already in use on 127.0.0.1")
        libs = ensure_jars(self.cache_dir, quiet=quiet)
        self.home.mkdir(parents=True, exist_ok=True)
        self._config.write_text(
            _SERVER_PROPERTIES.format(
                port=self.port,
                controller_port=self.controller_port,
                data=self._data.resolve(),
                partitions=self.partitions,
            )
        )
        java = _java()
        classpath = f"{libs}/*"
        if not (self._data / "meta.properties").exists():
            cluster_id = urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            proc = subprocess.run(
                [
                    java,
                    "-cp",
                    classpath,
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    # "=": an id may start with "-", which argparse would read as an option.
                    f"--cluster-id={cluster_id}",
                    "-c",
                    str(self._config),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise BrokerError(f"formatting Kafka storage failed:\n{proc.stdout}{proc.stderr}")
        log4j = self.home / "log4j2.properties"
        log4j.write_text(
            "rootLogger.level=INFO\nrootLogger.appenderRef.out.ref=OUT\n"
            "appender.out.type=Console\nappender.out.name=OUT\n"
            "appender.out.layout.type=PatternLayout\n"
            "appender.out.layout.pattern=[%d] %p %m (%c)%n\n"
            "logger.kafka.name=kafka\nlogger.kafka.level=INFO\n"
            "logger.state.name=state.change.logger\nlogger.state.level=WARN\n"
        )
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(
                [
                    java,
                    f"-Xmx{self.heap}",
                    f"-Xms{self.heap}",
                    "-XX:+UseG1GC",
                    "-Djava.awt.headless=true",
                    f"-Dlog4j2.configurationFile={log4j}",
                    "-cp",
                    classpath,
                    "kafka.Kafka",
                    str(self._config),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the caller's terminal stops it via stop()
            )
        self._pid_file.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise BrokerError(
                    f"the broker exited with code {proc.returncode}; last log lines:\n"
                    + self._tail_log()
                )
            if self.is_ready(timeout_s=2.0):
                return
            time.sleep(0.3)
        self.stop()
        raise BrokerError(f"the broker did not answer within {timeout_s:.0f}s:\n{self._tail_log()}")

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after ``timeout_s``)."""
        pid = self.pid()
        if pid is None:
            self._pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(0.2)
        else:
            log.warning("broker %s ignored SIGTERM for %.0fs; killing it", pid, timeout_s)
            os.kill(pid, signal.SIGKILL)
        self._pid_file.unlink(missing_ok=True)
        return True

    def _tail_log(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
