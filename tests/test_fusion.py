import itertools

import pytest

torch = pytest.importorskip("torch")

from polysense.models import FUSIONS, create_fusion  # noqa: E402

pytestmark = pytest.mark.slow  # torch

M, D, C = 3, 16, 5
MASKS = [m for m in itertools.product([0.0, 1.0], repeat=M) if any(m)]


@pytest.mark.parametrize("name", sorted(FUSIONS))
@pytest.mark.parametrize("batch", [1, 3])
def test_every_subset_gives_logits_that_ignore_absent_modalities(name, batch):
    torch.manual_seed(0)
    head = create_fusion(name, num_modalities=M, embed_dim=D, num_classes=C).eval()
    for mask_row in MASKS:
        mask = torch.tensor([mask_row] * batch)
        embeddings = torch.randn(batch, M, D)
        scrambled = embeddings.clone()
        scrambled[mask == 0] = torch.randn(int((mask == 0).sum()), D) * 100
        with torch.no_grad():
            logits = head(embeddings, mask)
            assert logits.shape == (batch, C) and torch.isfinite(logits).all()
            torch.testing.assert_close(head(scrambled, mask), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_mixed_masks_in_one_batch_match_rows_alone(name):
    torch.manual_seed(0)
    head = create_fusion(name, num_modalities=M, embed_dim=D, num_classes=C).eval()
    mask = torch.tensor(MASKS)
    embeddings = torch.randn(len(MASKS), M, D)
    with torch.no_grad():
        together = head(embeddings, mask)
        for row in range(len(MASKS)):
            torch.testing.assert_close(
                together[row : row + 1],
                head(embeddings[row : row + 1], mask[row : row + 1]),
                atol=1e-5,
                rtol=1e-5,
            )


@pytest.mark.parametrize("name", sorted(FUSIONS))
def test_gradients_reach_present_embeddings(name):
    torch.manual_seed(0)
    head = create_fusion(name, num_modalities=M, embed_dim=D, num_classes=C)
    embeddings = torch.randn(4, M, D, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0]] * 4)
    head(embeddings, mask).sum().backward()
    assert embeddings.grad[:, 0].abs().sum() > 0 and embeddings.grad[:, 2].abs().sum() > 0
    assert embeddings.grad[:, 1].abs().sum() == 0
