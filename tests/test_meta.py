"""MAML / Meta-SGD, learned optimizers, hyperoptimizer stacks, tasks and distributed meta-grads."""

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.func import grad

from selfmod import hypergrad, optim, tree
from selfmod.meta import adapt, maml_step, meta_sgd_optimizer
from selfmod.optim.learned import (
    init_lstm_optimizer,
    init_mlp_optimizer,
    lstm_optimizer,
    mlp_optimizer,
    preprocess_gradients,
)
from selfmod.tasks import DigitsTasks, SineTasks, TemplateTasks


def _net(p, x):
    return F.linear(torch.tanh(F.linear(x, p["w1"], p["b1"])), p["w2"], p["b2"])


def _params(d_in=1, hidden=8, d_out=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(hidden, d_in, generator=g, dtype=torch.float64) * 0.5,
        "b1": torch.zeros(hidden, dtype=torch.float64),
        "w2": torch.randn(d_out, hidden, generator=g, dtype=torch.float64) * 0.5,
        "b2": torch.zeros(d_out, dtype=torch.float64),
    }


def _mse(p, batch):
    x, y = batch
    return ((_net(p, x) - y) ** 2).mean()


def _sine_episodes(n, seed=0):
    tasks = SineTasks()
    eps = [tasks.sample(5, 10, seed=seed + i) for i in range(n)]
    return [
        type(e)(*(t.double() for t in (e.x_support, e.y_support, e.x_query, e.y_query)))
        for e in eps
    ]


def test_maml_second_order_matches_an_independent_torch_func_maml():
    params, episodes = _params(), _sine_episodes(3)
    steps, lr = 2, 0.1

    def query_loss_after_adaptation(p, ep):
        for _ in range(steps):
            g = grad(_mse)(p, ep.support)
            p = {k: p[k] - lr * g[k] for k in p}
        return _mse(p, ep.query)

    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for ep in episodes:
        g = grad(query_loss_after_adaptation)(params, ep)
        expected = {k: expected[k] + g[k] / len(episodes) for k in expected}
    got = maml_step(_mse, params, episodes, steps=steps, inner_lr=lr)
    for k in params:
        torch.testing.assert_close(got.params[k], expected[k], rtol=1e-10, atol=1e-12)


def test_maml_matches_hypergrad_reverse_and_first_order_differs():
    params, (ep,) = _params(), _sine_episodes(1)
    inner = lambda p, h, b: _mse(p, b)  # noqa: E731
    res = hypergrad.reverse(inner, inner, optim.sgd(0.1), params, {}, [ep.support] * 3, ep.query)
    second = maml_step(_mse, params, [ep], steps=3, inner_lr=0.1)
    first = maml_step(_mse, params, [ep], steps=3, inner_lr=0.1, first_order=True)
    adapted = adapt(_mse, optim.sgd(0.1), params, {}, ep.support, 3)
    fo = grad(_mse)(adapted, ep.query)
    for k in params:
        torch.testing.assert_close(second.params[k], res.params[k], rtol=1e-12, atol=0)
        torch.testing.assert_close(first.params[k], fo[k], rtol=1e-12, atol=1e-14)
    assert max(float((second.params[k] - first.params[k]).abs().max()) for k in params) > 1e-6


def test_meta_sgd_step_size_gradient_matches_finite_differences():
    params, episodes = _params(), _sine_episodes(2)
    opt, alphas = meta_sgd_optimizer(params)
    got = maml_step(_mse, params, episodes, steps=2, optimizer=opt, hparams=alphas)
    key, idx, eps = "alpha.w1", (3, 0), 1e-6

    def meta_loss(a):
        return maml_step(_mse, params, episodes, steps=2, optimizer=opt, hparams=a).loss

    plus, minus = tree.clone(alphas), tree.clone(alphas)
    plus[key][idx] += eps
    minus[key][idx] -= eps
    fd = (meta_loss(plus) - meta_loss(minus)) / (2 * eps)
    assert float(got.hparams[key][idx]) == pytest.approx(float(fd), rel=1e-5)


def _distributed_worker(rank, world, path, out):
    import torch.distributed as dist

    from selfmod.meta import distributed as D

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        params, episodes = _params(), _sine_episodes(5)
        mine = D.shard(episodes)
        res = maml_step(_mse, params, mine, steps=2, inner_lr=0.1, total_tasks=len(episodes))
        summed = D.all_reduce_sum({"loss": res.loss.reshape(1).double(), **res.params})
        if D.is_main_process():
            torch.save(summed, out)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_meta_gradient_equals_one_process(tmp_path):
    out = tmp_path / "summed.pt"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2)
    summed = torch.load(out)
    params, episodes = _params(), _sine_episodes(5)
    single = maml_step(_mse, params, episodes, steps=2, inner_lr=0.1)
    assert float(summed["loss"]) == pytest.approx(float(single.loss), abs=1e-6)
    for k in params:
        torch.testing.assert_close(summed[k], single.params[k], rtol=0, atol=1e-6)


def test_preprocessing_is_log_and_sign():
    g = torch.tensor([1e-6, -2.0, 1e-3, 0.0], dtype=torch.float64)
    x = preprocess_gradients(g, p=10.0)
    torch.testing.assert_close(
        x[1], torch.tensor([torch.log(torch.tensor(2.0)) / 10, -1.0], dtype=torch.float64)
    )
    assert x[0, 0] == -1.0 and x[0, 1] == pytest.approx(torch.e**10 * 1e-6)  # tiny: (-1, e^p g)
    assert x[3].tolist() == [-1.0, 0.0]


@pytest.mark.parametrize("kind", ["lstm", "mlp"])
def test_learned_optimizer_meta_gradient_matches_finite_differences(kind):
    """Directional check: <d value / d weights, v> against a central difference along v."""
    make, init = {
        "lstm": (lstm_optimizer, init_lstm_optimizer),
        "mlp": (mlp_optimizer, init_mlp_optimizer),
    }[kind]
    opt = make()
    weights = {k: v.double() for k, v in init(seed=1).items()}
    params = _params(d_in=1, hidden=4)
    (ep,) = _sine_episodes(1)
    inner = lambda p, h, b: _mse(p, b)  # noqa: E731
    res = hypergrad.reverse(inner, inner, opt, params, weights, [ep.support] * 4, ep.query)
    gen = torch.Generator().manual_seed(0)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in weights.items()}

    def value(w):
        return float(
            hypergrad.reverse(inner, inner, opt, params, w, [ep.support] * 4, ep.query).value
        )

    eps = 1e-5
    fd = (value(tree.add(weights, direction, eps)) - value(tree.add(weights, direction, -eps))) / (
        2 * eps
    )
    assert float(tree.vdot(res.hparams, direction)) == pytest.approx(fd, rel=1e-6)
    assert all(float(g.abs().max()) > 0 for k, g in res.hparams.items() if "w_hh0" not in k)


def test_lstm_optimizer_round_trips_through_its_checkpoint(tmp_path):
    weights = init_lstm_optimizer(seed=3)
    save_file(weights, str(tmp_path / "lstm.safetensors"))
    loaded = load_file(str(tmp_path / "lstm.safetensors"))
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    opt = lstm_optimizer()
    params = {"w": torch.randn(5, 3)}
    grads = {"w": torch.randn(5, 3)}
    a, _ = opt.update(grads, opt.init(params), params, weights)
    b, _ = opt.update(grads, opt.init(params), params, loaded)
    # same weights; a different memory alignment may change the last bit of a matmul
    torch.testing.assert_close(a["w"], b["w"], rtol=1e-6, atol=1e-9)


def test_meta_training_the_lstm_optimizer_lowers_the_meta_loss():
    """A few truncated meta-steps on sine regression: the learned rule gets better."""
    torch.manual_seed(0)
    opt = lstm_optimizer()
    weights = {k: v.double() for k, v in init_lstm_optimizer(seed=0).items()}
    meta = optim.adam(1e-2)
    meta_state = meta.init(weights)
    inner = lambda p, h, b: _mse(p, b)  # noqa: E731
    episodes = _sine_episodes(8, seed=100)

    def meta_loss(w):
        return sum(
            hypergrad.reverse(
                inner, inner, opt, _params(seed=i), w, [ep.support] * 10, ep.query
            ).value
            for i, ep in enumerate(episodes)
        )

    before = float(meta_loss(weights))
    for step in range(40):
        ep = _sine_episodes(1, seed=step)[0]
        res = hypergrad.truncated(
            inner, inner, opt, _params(seed=step), weights, [ep.support] * 10, ep.query, window=5
        )
        updates, meta_state = meta.update(res.hparams, meta_state, weights)
        weights = optim.apply_updates(weights, updates)
    assert float(meta_loss(weights)) < 0.8 * before


def test_hyperoptimizer_stack_of_height_3_moves_its_top_learned_step_size():
    """f = ||w||^2 / 2 from a learning rate far too small: every level speeds the one below."""
    stack = optim.hyperoptimizer_stack(0.01, [0.1, 0.1, 0.1])
    start = torch.tensor([0.3, -0.2], dtype=torch.float64)
    params = {"w": start}
    state = stack.init(params)
    for _ in range(100):
        updates, state = stack.update({"w": params["w"]}, state, params)
        params = optim.apply_updates(params, updates)
    assert state.hyper_lrs.shape == (2,)
    assert float(state.hyper_lrs[1]) > 0.1 * (1 + 1e-5)  # the top learned level moved up
    assert float(state.hyper_lrs[0]) > float(state.hyper_lrs[1])  # and the one below more
    assert float(state.lr) > 0.1
    plain = start * (1 - 0.01) ** 100  # plain SGD at the starting rate
    assert float(params["w"].norm()) < 1e-3 * float(plain.norm())


def test_stack_of_height_1_is_hypergradient_descent():
    a, b = optim.hyperoptimizer_stack(0.1, [0.01]), optim.sgd_hd(0.1, 0.01)
    params = {"w": torch.randn(4, dtype=torch.float64)}
    sa, sb = a.init(params), b.init(params)
    for _ in range(5):
        g = {"w": torch.sin(params["w"])}
        ua, sa = a.update(g, sa, params)
        ub, sb = b.update(g, sb, params)
        assert torch.equal(ua["w"], ub["w"])
        params = optim.apply_updates(params, ua)
    with pytest.raises(ValueError, match="per_tensor supports a stack of height 1"):
        optim.hyperoptimizer_stack(0.1, [0.01, 0.001], per_tensor=True)


def test_template_tasks_are_seeded_and_hold_out_classes():
    tasks = TemplateTasks(num_templates=20, seed=0)
    a = tasks.sample(5, 1, 3, "train", seed=7)
    b = tasks.sample(5, 1, 3, "train", seed=7)
    assert torch.equal(a.x_support, b.x_support) and torch.equal(a.x_query, b.x_query)
    assert a.x_support.shape == (5, 40) and a.x_query.shape == (15, 40)
    assert sorted(a.y_support.tolist()) == [0, 1, 2, 3, 4]
    assert set(tasks.classes("train")).isdisjoint(tasks.classes("test"))
    assert not torch.equal(tasks.sample(5, 1, 3, "train", seed=8).x_support, a.x_support)
    with pytest.raises(ValueError, match="n_way must be in"):
        tasks.sample(9, 1, 1, "test")


def test_digits_tasks_use_only_their_split_classes():
    tasks = DigitsTasks(train_classes=(0, 1, 2, 3, 4, 5, 6))
    ep = tasks.sample(3, 2, 4, "test", seed=0)
    assert ep.x_support.shape == (6, 64) and ep.x_query.shape == (12, 64)
    # the three test classes are 7, 8, 9: every support row matches a digit from those classes
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rows = {
        tuple((torch.as_tensor(r) / 16.0).float().tolist()): int(t)
        for r, t in zip(bunch.data, bunch.target, strict=True)
    }
    assert {rows[tuple(r.tolist())] for r in ep.x_support} <= {7, 8, 9}


@pytest.fixture(autouse=True)
def _no_thread_oversubscription():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(old)
