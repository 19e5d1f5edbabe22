"""The edge agent service: configuration, data loading and the MQTT link around EdgeAgent."""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path

from edge_agent.config import AgentConfig as AgentConfig  # re-exported: moved to a light module
from edge_agent.metrics import NO_EVENTS, AgentEvents, AgentMetrics
from edge_agent.presence import PresenceSession
from federation import exit_codes
from federation.config import ConfigError
from federation.keys import DeviceBundle
from federation.mqtt import LIVENESS_PERIODS, MqttLink
from federation.observability import Endpoints, serve_metrics
from federation.systemd import Notifier
from federation.topics import Topics

log = logging.getLogger(__name__)


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/2), got {text!r}") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard {text}: need 0 <= i < n")
    return index, count


def run(config: AgentConfig, *, stop: threading.Event | None = None) -> int:
    # torch only here: the CLI builds its parser from AgentConfig without loading it.
    import torch

    from edge_agent.agent import AgentSettings, EdgeAgent
    from edge_agent.registration import check_registration, fingerprint, published_fingerprint
    from federation.tasks import get_task

    stop = stop or threading.Event()
    torch.set_num_threads(max(1, config.threads))
    bundle = DeviceBundle.load(config.bundle)
    shard, num_shards = parse_shard(config.shard)
    options = {"path": config.data, "target": config.target} if config.task == "csv" else {}
    task = get_task(config.task, **options)
    data = task.load(shard, num_shards, seed=0, limit=config.limit or None)
    state_dir = Path(config.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    if data.scaler is not None:
        # Kept so that predictions can be mapped back to the original units.
        (state_dir / "scaler.json").write_text(json.dumps(data.scaler, indent=2))
    log.info("device %s: task %s, shard %d/%d, %d train / %d test samples", bundle.device_id, task.name,
             shard, num_shards, len(data.train_y), len(data.test_y))
    raw = fingerprint(task, data, config.shard, config.limit or None)
    check_registration(state_dir, raw, reregister=config.reregister)
    dataset = published_fingerprint(state_dir, raw)  # the salted commitment, never the bare SHA-256
    topics = Topics(bundle.fleet, config.topic_prefix)
    presence = PresenceSession(bundle)
    link = MqttLink(config, config.client_id or f"fledger-agent-{bundle.device_id}",
                    subscriptions=[topics.model, topics.model_chunks, topics.ack(bundle.device_id),
                                   topics.catch_up_reply(bundle.device_id, "model")],
                    will=(topics.presence(bundle.device_id), presence.last_will(), True))
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, _on_sighup)
    endpoints = Endpoints()
    events = _metrics(config, bundle.fleet, bundle.device_id, task.name, endpoints)  # a bad port fails before MQTT
    # Our own heartbeat is the echo: when not even it comes back, the path is dead.
    link.watch(topics.presence(bundle.device_id), LIVENESS_PERIODS * config.heartbeat)
    notifier = Notifier()
    try:
        if not link.start(timeout=120, stop=stop):
            endpoints.stop()
            return 0  # stopped while connecting
    except BaseException:
        endpoints.stop()
        raise
    agent = EdgeAgent(bundle, task, data, link, topics, state_dir,
                      AgentSettings(resend_interval_s=config.resend_interval, heartbeat_s=config.heartbeat,
                                    exit_when_done=config.exit_when_done, seed=config.seed,
                                    accept_reset=config.accept_reset),
                      dataset=dataset, register=True, presence=presence)
    notifier.ready(f"device {bundle.device_id}: connected, {len(agent.outbox.rounds())} updates in the outbox")
    agent.events = events
    try:
        agent.run(stop=lambda: stop.is_set() or link.failed is not None, alive=notifier.alive)
        notifier.stopping()
        if link.failed is None:
            # Waiting for the broker's acknowledgement only makes sense while connected.
            link.publish(topics.presence(bundle.device_id), presence.statement("offline"), retain=True,
                         wait=2 if link.connected.is_set() else None)
    finally:
        link.stop(timeout=2)
        endpoints.stop()
    log.info("device %s: stopped after rounds %s", bundle.device_id, agent.trained_rounds)
    if link.failed is not None:
        log.error("device %s: stopped because the MQTT link gave up (see above)", bundle.device_id)
        return exit_codes.UNREACHABLE
    return 0


def _on_sighup(signum: int, frame: object) -> None:
    # `systemctl reload` must never kill a device (Python's default for SIGHUP is to die).
    log.info("SIGHUP: the agent has nothing to reload; restart it to apply changed settings")


def _metrics(config: AgentConfig, fleet: str, device: str, task: str, endpoints: Endpoints) -> AgentEvents:
    """Prometheus metrics on --metrics-port, or nothing."""
    if not config.metrics_port:
        return NO_EVENTS
    metrics = AgentMetrics(fleet, device, task)
    endpoints.add(serve_metrics(metrics.registry, config.metrics_host, config.metrics_port))
    return metrics
