"""The functional meta step shared by meta-learning methods (DDDefense self-meta learning, eq. 9-13).

    theta_temp = theta - alpha * grad L_meta-train(theta)                            (eq. 9)
    L = L_meta-train(theta) + L_meta-test(theta_temp)                         (eq. 12-13)

computed with ``torch.func.functional_call`` on the live module: no deep copy of the model, and the
meta-test loss keeps its dependence on theta through theta_temp (second-order terms, the Hessian-
vector product of the paper's expansion) unless ``first_order`` drops them (theta_temp's gradient
is then treated as a constant, as first-order MAML: about half the cost of the meta step's
backward, documented in README).

Cost of the second-order term: the outer backward differentiates the inner gradient's graph (reverse
over reverse), as much as ~2.9 plain forward+backward passes of the meta-train rows on the demo
ResNet-18 on CPU (BatchNorm's double backward ~0.9 of them). Forward over reverse
(``torch.func.jvp`` of the gradient) measured 1.7x slower than reverse over reverse. A central finite-difference product (DARTS-style, two plain
passes) is not used: on ReLU networks the gradient jumps at activation kinks, and at r = 0.01/|v| it
differed from autograd's H v by 15-23x its norm on ResNet-18 (5e-4 on a softplus copy of the same
network), so it would not be this paper's second-order term.

BatchNorm: both forwards normalise with their own batch statistics (train mode). The running
statistics are updated by the meta-train forward only; the meta-test forward runs the temporary
weights on copies of the buffers, so statistics of weights that are never kept do not leak into
the model used at test time.
"""
import torch


def split_by_identity(pids, test_fraction):
    """Boolean (B,) mask of the meta-test rows: a random ``test_fraction`` of the batch's identities
    (at least one, and at least one left for meta-train), all rows of an identity on one side, so
    meta-test identities are unseen in meta-train (DDDefense: 3:1, ``test_fraction`` 0.25)."""
    ids = torch.unique(pids)
    if len(ids) < 2:
        raise ValueError(f"self-meta learning needs at least 2 identities per batch, got {len(ids)}")
    n_test = min(max(int(round(len(ids) * test_fraction)), 1), len(ids) - 1)
    test_ids = ids[torch.randperm(len(ids))[:n_test].to(ids.device)]
    return torch.isin(pids, test_ids)


def subset(batch, rows):
    """The rows (bool mask) of every per-sample entry of a fastreid batch dict."""
    index = rows.nonzero(as_tuple=True)[0]
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == len(rows):
            out[key] = value[index]
        elif isinstance(value, (list, tuple)) and len(value) == len(rows):
            out[key] = [value[i] for i in index.tolist()]
        else:
            out[key] = value
    return out


def meta_losses(module, loss_fn, meta_train, meta_test, inner_lr, first_order=False):
    """{"meta_train/<name>": ..., "meta_test/<name>": ...} whose sum is eq. 13's objective.

    ``loss_fn(params, batch)`` returns a dict of scalar losses of ``module`` run with ``params``
    (a name -> tensor dict for ``functional_call``). The parameters are ``module``'s trainable ones.
    """
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    train_losses = loss_fn(params, meta_train)
    grads = torch.autograd.grad(sum(train_losses.values()), list(params.values()),
                                create_graph=not first_order, allow_unused=True)
    temporary = {name: p if g is None else p - inner_lr * (g.detach() if first_order else g)
                 for (name, p), g in zip(params.items(), grads)}
    temporary.update({name: b.clone() for name, b in module.named_buffers()})  # see module doc
    test_losses = loss_fn(temporary, meta_test)
    # grad L_meta-train is `grads`, already computed: the returned meta-train terms carry it through
    # a linear stand-in with the same value, so the caller's backward does not differentiate the
    # meta-train graph a second time (only the Hessian-vector product of theta_temp runs through it).
    linear = sum((p * g.detach()).sum() for p, g in zip(params.values(), grads) if g is not None)
    train_losses = {k: v.detach() for k, v in train_losses.items()}
    first = next(iter(train_losses))
    train_losses[first] = train_losses[first] + (linear - linear.detach())
    return {**{f"meta_train/{k}": v for k, v in train_losses.items()},
            **{f"meta_test/{k}": v for k, v in test_losses.items()}}
