"""Write examples/pump-readings.csv: a small SYNTHETIC data set for the README's fleet by hand.

1,200 hourly readings of one water pump: eight sensor columns and the target,
``bearing_temp_c``, which depends on them (load heats the bearing, cooling follows the inlet
and ambient temperatures, wear grows with run hours) plus noise. Made up, seeded, so anyone
can regenerate the identical file: ``python examples/make_pump_readings.py``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

ROWS = 1200
SEED = 18

COLUMNS = ("flow_m3h", "pressure_bar", "motor_current_a", "speed_rpm", "vibration_mm_s",
           "inlet_temp_c", "ambient_temp_c", "run_hours", "bearing_temp_c")


def readings(rows: int = ROWS, seed: int = SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    speed = rng.uniform(1000, 3000, rows)
    flow = speed / 3000 * rng.uniform(30, 60, rows)
    pressure = 1.5 + 0.0008 * speed + rng.normal(0, 0.2, rows)
    current = 4 + 0.004 * speed + 0.05 * flow + rng.normal(0, 0.5, rows)
    run_hours = np.sort(rng.uniform(0, 20_000, rows))
    vibration = 1.0 + 0.00015 * run_hours + 0.0004 * speed + rng.gamma(2.0, 0.2, rows)
    inlet = rng.uniform(8, 22, rows)
    ambient = rng.uniform(5, 35, rows)
    bearing = (0.35 * inlet + 0.3 * ambient + 0.9 * current + 0.004 * speed + 2.5 * vibration
               + 0.0002 * run_hours + rng.normal(0, 1.0, rows))
    return np.column_stack([flow, pressure, current, speed, vibration, inlet, ambient, run_hours, bearing])


def main() -> None:
    path = Path(__file__).with_name("pump-readings.csv")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in readings():
            writer.writerow([f"{value:.2f}" for value in row])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
