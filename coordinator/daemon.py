"""The coordinator daemon: the MQTT shell around :class:`coordinator.service.Coordinator`.

paho's network thread only enqueues messages; this worker thread does all the checking,
decryption, aggregation and disk writes, so a slow step never stalls the MQTT connection.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.prediction_daemon import (
    build_prediction_service,
    is_prediction_topic,
    prediction_subscriptions,
    take_batch,
)
from coordinator.registry_file import RegistryFile
from coordinator.rounds import RoundPolicy
from coordinator.service import Coordinator, CoordinatorSettings, Evaluate
from coordinator.storage import ModelStore, Spool
from federation import envelope
from federation.config import setting
from federation.keys import CoordinatorKeys, DeviceRegistry
from federation.mqtt import BrokerConfig, MqttLink
from federation.tasks import get_task
from federation.topics import Topics
from ledger import Ed25519Signer, Ledger

log = logging.getLogger(__name__)


DEFAULT_REPLAY_BATCH = 10_000  # ledger blocks per replay request: bounded, the monitor asks again


@dataclass
class CoordinatorConfig(BrokerConfig):
    fleet: str = setting("demo", "fleet name (a topic level; letters, digits, '_' and '-')")
    state_dir: Path = setting(Path("state/coordinator"), "directory for ledger, models and spool")
    keys: Path = setting(Path("keys/coordinator.json"), "coordinator key file (from `fledger keys init`)")
    devices: Path = setting(Path("keys/devices.json"), "device registry (public keys; `fledger keys add-device`); "
                                                       "re-read every 2 s and on SIGHUP: changes apply live")
    task: str = setting("california", "model/task: california, mnist, or csv")
    csv_features: int = setting(0, "for task csv: number of feature columns of the model")
    min_clients: int = setting(2, "aggregate a round as soon as this many updates are in")
    quorum: int = setting(1, "after the deadline, aggregate with at least this many updates")
    round_deadline: float = setting(300.0, "seconds a round stays open before a quorum may close it (0: none)")
    rounds: int = setting(0, "stop after this many rounds (0: run until stopped)")
    strategy: str = setting("fedavg", "aggregation: fedavg (weighted by samples) or mean")
    max_update_bytes: int = setting(64 * 1024 * 1024, "largest update accepted, checked before decoding")
    difficulty: int = setting(0, "ledger proof of work: leading zero bits per block (0: off)")
    evaluate: bool = setting(False, "evaluate each new global model on the task's held-out test set")
    seed: int = setting(0, "seed for the initial model")
    client_id: str = setting("", "MQTT client id (default: fledger-coordinator-<fleet>)")
    replay_batch: int = setting(DEFAULT_REPLAY_BATCH, "ledger blocks sent per replay request from a monitor "
                                                      "(it asks again for the rest)")
    presence_timeout: float = setting(45.0, "mark a device offline after this many seconds without a heartbeat "
                                            "(0: only its Last Will)")
    clients: Path = setting(Path("keys/clients.json"), "prediction client registry (`fledger keys add-client`); "
                                                       "re-read every 2 s and on SIGHUP")
    predict_fee: int = setting(1, "fee of a prediction in the smallest unit (integer), see --predict-fee-per")
    predict_fee_per: str = setting("request", "charge the fee per 'request' or per 'row'")
    predict_max_rows: int = setting(1024, "most rows (or images) in one prediction request")
    predict_max_bytes: int = setting(1 << 20, "largest prediction request accepted, checked before decoding")
    predict_scaler: Path | None = setting(None, "an agent's scaler.json: maps prediction inputs and outputs to "
                                                "original units (required for task csv; california's is "
                                                "computed from the vendored data)")


def round_policy(config: CoordinatorConfig) -> RoundPolicy:
    """The round settings, checked (ValueError) before anything is opened or connected."""
    if config.quorum > config.min_clients:
        raise ValueError(f"quorum ({config.quorum}) cannot exceed min_clients ({config.min_clients}): a round "
                         "closes as soon as min_clients updates are in")
    return RoundPolicy(config.min_clients, config.quorum, config.round_deadline)


def build_coordinator(config: CoordinatorConfig, publish: Any, *, evaluate: Evaluate | None = None) -> Coordinator:
    policy = round_policy(config)  # checked before any file is opened
    keys = CoordinatorKeys.load(config.keys)
    if keys.fleet != config.fleet:
        raise ValueError(f"key file {config.keys} is for fleet {keys.fleet!r}, not {config.fleet!r}")
    registry = DeviceRegistry.load(config.devices)
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    ledger = Ledger.open(state / "ledger.log", signer=Ed25519Signer(keys.sign_seed), fleet=config.fleet,
                         difficulty=config.difficulty)
    task = get_task(config.task, n_features=config.csv_features or None)

    def initial_model() -> dict[str, Any]:
        import torch

        torch.manual_seed(config.seed)
        return {k: v.detach().numpy().copy() for k, v in task.build_model().state_dict().items()}

    if evaluate is None and config.evaluate:
        evaluate = make_evaluator(config.task)
    settings = CoordinatorSettings(
        fleet=config.fleet,
        policy=policy,
        strategy=config.strategy, max_rounds=config.rounds, max_update_bytes=config.max_update_bytes,
    )
    return Coordinator(settings, keys, registry, ledger, ModelStore(state / "models"), Spool(state / "spool"),
                       initial_model=initial_model, publish=publish, topics=Topics(config.fleet, config.topic_prefix),
                       evaluate=evaluate, task_info={"task": config.task})


def make_evaluator(task_name: str) -> Evaluate:
    """Central evaluation of each new global model on the task's held-out test set."""
    import torch

    from federation.evaluation import evaluate
    from federation.tasks import central_test_set

    task = get_task(task_name)
    test_x, test_y = central_test_set(task)
    model = task.build_model()

    def run_eval(weights: dict[str, Any]) -> dict[str, float]:
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
        return evaluate(model, test_x, test_y, task.kind)

    return run_eval


REGISTRY_CHECK_S = 2.0  # how often devices.json is checked for added, rotated or revoked keys


def run(config: CoordinatorConfig, *, stop: threading.Event | None = None) -> int:
    """Run until ``rounds`` are done or a signal arrives. Returns a process exit code."""
    round_policy(config)  # bad settings fail now, not after connecting to the broker
    stop = stop or threading.Event()
    topics = Topics(config.fleet, config.topic_prefix)
    # Reassemble no chunked message larger than the largest update we would accept anyway.
    link_config = dataclasses.replace(config, max_message_bytes=min(config.max_message_bytes, config.max_update_bytes))
    link = MqttLink(link_config, config.client_id or f"fledger-coordinator-{config.fleet}",
                    subscriptions=[topics.updates, topics.registrations, topics.presences, topics.ledger_replay,
                                   *prediction_subscriptions(topics)])
    first_model = [True]

    def publish(topic: str, payload: bytes, retain: bool) -> None:
        if topic == topics.model:
            # The model may exceed the broker's payload limit: chunked; stale chunks of a model
            # published before a restart are cleared on the first publish.
            link.publish(topic, payload, retain=retain, chunked=True, clear_stale_chunks=first_model[0])
            first_model[0] = False
        else:
            link.publish(topic, payload, retain=retain)

    reload_now = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, lambda *_: reload_now.set())  # `systemctl reload`
    link.start(timeout=60)
    registry_file = RegistryFile(config.devices)  # before loading it: a change in between is seen
    coordinator = build_coordinator(config, publish)
    coordinator.start()
    clients_file = RegistryFile(config.clients)

    def publish_reply(topic: str, payload: bytes) -> None:
        link.publish(topic, payload, chunked=True)  # a large reply (many rows) is chunked like a model

    predictions = build_prediction_service(config, coordinator, publish_reply, publish)
    connects = link.connect_count
    last_tick = last_registry_check = 0.0
    try:
        while not stop.is_set():
            try:
                message = link.inbox.get(timeout=0.5)
            except queue.Empty:
                message = None
            try:
                if link.connect_count != connects:
                    # The broker may have restarted and lost retained messages: publish them again.
                    connects = link.connect_count
                    coordinator.publish_model()
                    coordinator.publish_status()
                    coordinator.publish_acks()
                if message is not None and is_prediction_topic(topics, message.topic) and not coordinator.halted:
                    batch, message = take_batch(message, link.inbox, topics)
                    predictions.handle_batch([(m.topic, m.payload) for m in batch])
                if message is not None:
                    _dispatch(coordinator, link, topics, message.topic, message.payload,
                              replay_batch=config.replay_batch)
            except Exception:  # one bad message or a bug must not end the daemon
                log.exception("unexpected error handling a message; continuing")
            try:  # apart from message handling, so that no stream of messages can starve it
                now = time.monotonic()
                if now - last_tick >= 0.5:
                    last_tick = now
                    coordinator.tick()
                    if coordinator.presence.expire(config.presence_timeout):
                        coordinator.publish_status()
                    link.expire_partial()
                if reload_now.is_set() or now - last_registry_check >= REGISTRY_CHECK_S:
                    reload_now.clear()
                    last_registry_check = now
                    registry = registry_file.changed()
                    if registry is not None:
                        try:
                            coordinator.reload_registry(registry)
                        except Exception as exc:  # KeyFileError, or storage: nothing adopted
                            registry_file.refused(f"{type(exc).__name__}: {exc}")
                        else:
                            registry_file.adopted()
                    clients = clients_file.changed()
                    if clients is not None:
                        predictions.clients = clients
                        clients_file.adopted()
                        log.info("prediction clients reloaded: %d", len(clients.devices))
            except Exception:  # a bug must not end the daemon
                log.exception("unexpected error in the coordinator's periodic work; continuing")
            if coordinator.done:
                log.info("all %d rounds done; ledger height %d", config.rounds, coordinator.ledger.head.index + 1)
                # Let the last publishes reach the broker before leaving.
                link.publish(topics.status, envelope.seal_status(coordinator.keys, coordinator.status()), retain=True,
                             wait=10)
                break
            if coordinator.halted:
                log.critical("halted: %s", coordinator.halted)
                # Tell devices and operators (retained), so nobody waits for an acknowledgement.
                link.publish(topics.status, envelope.seal_status(coordinator.keys, coordinator.status()), retain=True,
                             wait=10)
                return 3
    finally:
        link.stop()
    return 0


def _dispatch(coordinator: Coordinator, link: MqttLink, topics: Topics, topic: str, payload: bytes, *,
              replay_batch: int = DEFAULT_REPLAY_BATCH) -> None:
    device = topics.device_of(topic)
    if device and topic == topics.update(device):
        coordinator.handle_update(topic, payload)
    elif device and topic == topics.register(device):
        coordinator.handle_registration(topic, payload)
    elif device and topic == topics.presence(device):
        if coordinator.handle_presence(topic, payload):
            coordinator.publish_status()
    elif topic == topics.ledger_replay:
        _replay(coordinator, link, topics, payload, batch=replay_batch)
    # anything else (amqtt hands out retained messages of other topics) is ignored


# Replays re-send blocks from the worker thread: bounded, so a monitor (or anyone on a broker
# without ACLs) cannot make the coordinator queue the whole ledger again and again.
REPLAY_INTERVAL_S = 2.0
_last_replay = [float("-inf")]
_replay_delivered: list[Callable[[], bool]] = [lambda: True]


def _replay(coordinator: Coordinator, link: MqttLink, topics: Topics, payload: bytes, *,
            batch: int = DEFAULT_REPLAY_BATCH) -> None:
    """A monitor asked for blocks from some height: re-send them on the ledger topic."""
    try:
        request = json.loads(payload) if len(payload) <= 256 else None
        start = request.get("from", 0) if isinstance(request, dict) else None
    except ValueError:
        start = None
    if type(start) is not int or start < 0:
        log.warning("malformed ledger replay request")
        return
    now = time.monotonic()
    if now - _last_replay[0] < REPLAY_INTERVAL_S:
        log.warning("ledger replay request ignored: at most one every %.0fs", REPLAY_INTERVAL_S)
        return
    if not _replay_delivered[0]():
        # Requests must not pile up blocks in the MQTT client's (unbounded) outgoing queue
        # faster than the broker takes them.
        log.warning("ledger replay request ignored: the previous replay is still being delivered")
        return
    _last_replay[0] = now
    blocks = [block.to_bytes() for block in coordinator.ledger.blocks(start, start + max(1, batch))]
    _replay_delivered[0] = link.publish_all(topics.ledger_blocks, blocks)
    log.info("replayed %d ledger blocks from height %d", len(blocks), start)
