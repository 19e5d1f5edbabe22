"""Wiring of the prediction service into the coordinator daemon (MQTT topics, settings, model).

The service runs inside the coordinator process because the ledger has one writer: receipts,
deposits and withdrawals are appended by the same worker thread that appends updates, so no
two requests are ever charged at once and no balance can go negative between check and charge.
"""

from __future__ import annotations

import hashlib
import logging
import queue
from typing import TYPE_CHECKING, Any

from coordinator.inference import make_predictor
from coordinator.predictions import CurrentModel, PredictionService, PredictionSettings, Publish
from coordinator.service import Coordinator
from federation import prediction_wire as wire
from federation.codec import encode_tensors
from federation.keys import DeviceRegistry
from federation.mqtt import Message, take_following
from federation.topics import Topics

if TYPE_CHECKING:
    from coordinator.config import CoordinatorConfig

log = logging.getLogger(__name__)


def prediction_subscriptions(topics: Topics) -> list[str]:
    return [wire.request_topics(topics), wire.order_topic(topics)]


def is_prediction_topic(topics: Topics, topic: str) -> bool:
    return topic == wire.order_topic(topics) or wire.client_of(topics, topic) is not None


PREDICTION_BATCH = 64  # queued requests answered with one ledger fsync (group commit)


def take_batch(first: Message, inbox: queue.Queue[Message], topics: Topics) -> tuple[list[Message], Message | None]:
    """``first`` and the prediction messages queued right behind it (at most PREDICTION_BATCH);
    also the first other message taken from the queue, which the caller must still handle."""
    return take_following(first, inbox, lambda topic: is_prediction_topic(topics, topic), max_count=PREDICTION_BATCH)


def prediction_settings(config: CoordinatorConfig) -> PredictionSettings:
    return PredictionSettings(fee=config.predict_fee, fee_per=config.predict_fee_per,
                              max_rows=config.predict_max_rows, max_request_bytes=config.predict_max_bytes)


def build_prediction_service(config: CoordinatorConfig, coordinator: Coordinator, publish: Publish
                             ) -> PredictionService:
    """The service answering with ``coordinator``'s current global model. Without a usable
    predictor (task csv and no --predict-scaler) every request is refused as ``unavailable``.

    New ledger blocks are announced as the coordinator's other blocks are (block, head,
    checkpoint), but only once they are durable."""
    predictor = None
    if not config.clients.exists():
        # No prediction clients: no predictor either (it would load torch for nothing). Clients
        # added later are refused as `unavailable` until the coordinator restarts.
        log.info("no prediction client registry %s: predictions are off", config.clients)
    else:
        try:
            predictor = make_predictor(config.task, n_features=config.csv_features, scaler=config.predict_scaler)
        except ValueError as exc:
            log.warning("predictions unavailable: %s", exc)
    digests: dict[int, bytes] = {}

    def current_model() -> CurrentModel:
        assert coordinator.round is not None
        number = coordinator.round.number
        if number not in digests:  # the model changes only when the round does
            digests.clear()
            digests[number] = hashlib.sha256(encode_tensors(coordinator.global_model)).digest()
        return CurrentModel(number, digests[number], coordinator.global_model)

    topics = Topics(config.fleet, config.topic_prefix)
    writer = coordinator.writer

    def append(record: dict[str, Any]) -> Any:
        # The one writer halts the process if the ledger cannot be written; blocks are announced
        # by the service once its group commit is durable.
        return writer.append(record, announce=False)

    return PredictionService(prediction_settings(config), coordinator.keys, DeviceRegistry.load(config.clients),
                             writer.state.accounts, append=append, model=current_model, predictor=predictor,
                             publish=publish, topics=topics, group_commit=writer.group_commit,
                             announce=writer.announce, block=coordinator.ledger.block)
