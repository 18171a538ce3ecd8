"""Helpers shared by the optimiser tests."""


def make_closure(opt, model, loss_fn, X, y):
    """The usual ``opt.step(closure)`` closure: zero grads, forward, backward."""

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    return closure


def closure_losses(opt, model, loss_fn, X, y, steps: int) -> list[float]:
    """The batch loss before and after each of ``steps`` closure steps."""
    closure = make_closure(opt, model, loss_fn, X, y)
    losses = [loss_fn(model(X), y).item()]
    for _ in range(steps):
        opt.step(closure)
        losses.append(loss_fn(model(X), y).item())
    return losses
