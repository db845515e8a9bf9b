"""The check shared by the adapters' loss tests: one pass over two feature sets gives each set's own losses."""
import torch


def assert_pair_is_each_alone(adapter, feats, images, targets, alone_student: dict, rtol: float) -> dict:
    """``losses_pair(feats, other)`` == (``losses(feats)``, ``losses(other)``); returns the student's losses."""
    other = {k: v * 0.5 + 0.1 for k, v in feats.items()}
    student, tea = adapter.losses_pair(feats, other, images, targets, adapter.heads())
    alone = adapter.losses(other, images, targets, adapter.heads())
    assert student.keys() == tea.keys() == alone_student.keys()
    for k in alone_student:
        torch.testing.assert_close(student[k], alone_student[k], rtol=rtol, atol=1e-6)
        torch.testing.assert_close(tea[k], alone[k], rtol=rtol, atol=1e-6)
    return student
