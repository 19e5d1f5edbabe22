"""Wiring of the prediction service into the coordinator daemon (MQTT topics, settings, model).

The service runs inside the coordinator process because the ledger has one writer: receipts,
deposits and withdrawals are appended by the same worker thread that appends updates, so no
two requests are ever charged at once and no balance can go negative between check and charge.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from coordinator.inference import make_predictor
from coordinator.predictions import CurrentModel, PredictionService, PredictionSettings, Publish
from coordinator.service import Coordinator
from federation import prediction_wire as wire
from federation.codec import encode_tensors
from federation.keys import DeviceRegistry
from federation.topics import Topics

if TYPE_CHECKING:
    from coordinator.daemon import CoordinatorConfig

log = logging.getLogger(__name__)


def prediction_subscriptions(topics: Topics) -> list[str]:
    return [wire.request_topics(topics), wire.order_topic(topics)]


def is_prediction_topic(topics: Topics, topic: str) -> bool:
    return topic == wire.order_topic(topics) or wire.client_of(topics, topic) is not None


def dispatch_prediction(service: PredictionService, topics: Topics, topic: str, payload: bytes) -> None:
    if topic == wire.order_topic(topics):
        service.handle_order(payload)
    else:
        service.handle_request(topic, payload)


def prediction_settings(config: CoordinatorConfig) -> PredictionSettings:
    return PredictionSettings(fee=config.predict_fee, fee_per=config.predict_fee_per,
                              max_rows=config.predict_max_rows, max_request_bytes=config.predict_max_bytes)


def build_prediction_service(config: CoordinatorConfig, coordinator: Coordinator, publish: Publish
                             ) -> PredictionService:
    """The service answering with ``coordinator``'s current global model. Without a usable
    predictor (task csv and no --predict-scaler) every request is refused as ``unavailable``."""
    try:
        predictor = make_predictor(config.task, n_features=config.csv_features, scaler=config.predict_scaler)
    except ValueError as exc:
        log.warning("predictions unavailable: %s", exc)
        predictor = None
    digests: dict[int, bytes] = {}

    def current_model() -> CurrentModel:
        assert coordinator.round is not None
        number = coordinator.round.number
        if number not in digests:  # the model changes only when the round does
            digests.clear()
            digests[number] = hashlib.sha256(encode_tensors(coordinator.global_model)).digest()
        return CurrentModel(number, digests[number], coordinator.global_model)

    return PredictionService(prediction_settings(config), coordinator.keys, DeviceRegistry.load(config.clients),
                             list(coordinator.ledger), append=coordinator._append, model=current_model,
                             predictor=predictor, publish=publish, topics=Topics(config.fleet, config.topic_prefix))
