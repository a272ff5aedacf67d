"""The delay-based window over a client's pieces in flight (``mux.uplink.PieceWindow``)."""

from __future__ import annotations

import math

from mux.uplink import BASE_BUCKET_S, BASE_BUCKETS, PieceWindow

PIECE = 16 << 10


def test_the_first_piece_always_goes_and_bytes_in_flight_are_counted() -> None:
    w = PieceWindow(PIECE)
    assert w.window == 2 * PIECE and w.in_flight == 0 and w.base_s == math.inf
    assert w.room(10 * PIECE)  # nothing in flight: even more than the window
    w.sent(PIECE)
    assert w.room(PIECE)
    w.sent(PIECE)
    assert not w.room(1)
    w.forget(PIECE)
    assert w.in_flight == PIECE and w.room(PIECE)
    w.forget(5 * PIECE)
    assert w.in_flight == 0


def test_no_queueing_opens_the_window_up_to_its_most() -> None:
    w = PieceWindow(PIECE, max_pieces=8)
    now = 0.0
    for _ in range(200):
        w.sent(PIECE)
        now += 0.001
        assert w.acked(PIECE, 0.002, now) == 0.0  # every confirmation at the path's own delay
    assert w.window == 8 * PIECE


def test_a_window_of_confirmations_moves_the_window_about_half_way_to_its_goal() -> None:
    w = PieceWindow(PIECE, target_s=0.010)
    w.sent(PIECE)
    w.acked(PIECE, 0.010, 0.0)  # the path's own delay: 10 ms
    w.window = 8 * PIECE
    for i in range(8):  # 8 pieces confirmed after 30 ms: 20 ms queued, the goal is 8 * 20 / 30
        w.sent(PIECE)
        w.acked(PIECE, 0.030, 0.001 * i)
    goal = 8 * PIECE * 20 / 30
    assert goal < w.window < 8 * PIECE
    assert abs(w.window - (goal + 8 * PIECE) / 2) < 0.6 * PIECE  # about half way


def test_the_window_at_most_doubles_per_window_of_confirmations() -> None:
    w = PieceWindow(PIECE, target_s=0.010)
    for i in range(2):  # the path's own delay: nothing queued, the goal is far above
        w.sent(PIECE)
        w.acked(PIECE, 0.001, 0.001 * i)
    assert 2 * PIECE < w.window <= 4 * PIECE


def test_queueing_over_the_target_closes_the_window_down_to_its_least() -> None:
    w = PieceWindow(PIECE, target_s=0.010, max_pieces=16)
    w.sent(PIECE)
    w.acked(PIECE, 0.002, 0.0)  # the path's own delay
    w.window = 16 * PIECE
    sizes = []
    for i in range(100):
        w.sent(PIECE)
        queueing = w.acked(PIECE, 0.032, 0.001 * i)  # 30 ms queued: three times the target
        assert abs(queueing - 0.030) < 1e-9
        sizes.append(w.window)
    assert sizes == sorted(sizes, reverse=True)
    assert w.window == PIECE


def test_queueing_at_the_target_holds_the_window() -> None:
    w = PieceWindow(PIECE, target_s=0.010)
    w.sent(PIECE)
    w.acked(PIECE, 0.005, 0.0)
    w.window = 5 * PIECE
    for i in range(50):
        w.sent(PIECE)
        w.acked(PIECE, 0.015, 0.01 * i)
    assert w.window == 5 * PIECE


def test_the_paths_delay_is_the_lowest_of_the_last_buckets() -> None:
    w = PieceWindow(PIECE)
    w.acked(PIECE, 0.004, 0.0)
    w.acked(PIECE, 0.009, 0.5)
    assert w.base_s == 0.004
    late = BASE_BUCKET_S * BASE_BUCKETS + 0.1  # the first bucket has aged out
    w.acked(PIECE, 0.009, late)
    assert w.base_s == 0.009


def test_lost_confirmations_halve_the_window_but_not_below_its_least() -> None:
    w = PieceWindow(PIECE, min_pieces=1)
    w.window = 8 * PIECE
    w.lost()
    assert w.window == 4 * PIECE
    for _ in range(5):
        w.lost()
    assert w.window == PIECE
