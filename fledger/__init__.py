"""fledger: federated learning for IoT fleets over MQTT, with a signed ledger of every model update."""

__version__ = "0.1.0"
