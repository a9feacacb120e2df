

def test_truncated_svds_of_a_low_rank_gradient():
    from algorithms.common import exact_truncated_svd, randomized_svd
    g = torch.Generator().manual_seed(4)
    low = torch.randn(60, 8, generator=g) @ torch.randn(8, 90, generator=g)  # rank 8, like a batch-8 gradient
    full = torch.randn(60, 90, generator=g)
    for a in (low, full):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        for k in (5, 12):
            ue, se, vhe = exact_truncated_svd(a, k)
            torch.testing.assert_close(se, s[:k], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close((ue * se) @ vhe, (u[:, :k] * s[:k]) @ vh[:k], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ue.T @ ue, torch.eye(k), rtol=0, atol=1e-4)
    # randomized: exact on a captured range, and the generator is drawn from the same either way
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    ur, sr, vhr = randomized_svd(low, 10, g1)
    torch.testing.assert_close((ur * sr) @ vhr, low, rtol=1e-4, atol=1e-4)
    randomized_svd(full, 10, g2)
    assert torch.equal(torch.randn(3, generator=g1), torch.randn(3, generator=g2))
