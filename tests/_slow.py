"""Paper-scale tables whose validation takes 10-20 s each (hundreds of cells): every test that
validates or composes them runs them under the `slow` marker; their own config tests validate them
too. Shared by tests/test_configs.py and tests/test_table_schema.py."""

PAPER_SCALE_TABLES = {
    "npc_main",
    "npc_main_classifiers",
    "prompt_b2n_base",
    "prompt_b2n_new",
    "prompt_b2n_hm",
    "prompt_fewshot",
    "prompt_xd",
    "prompt_dg",
    "cdesc_main",
    *(
        f"mixdiff_{b}_{m}"
        for b in ("cifar10", "cifar_plus10", "cifar_plus50", "cifar100", "tinyimagenet")
        for m in ("auroc", "fpr95")
    ),
}
