"""The training and evaluation programs (`convirt train`, `convirt pretrain-text`, `convirt eval`).

`convirt train`
    cli.py             the train and eval command lines; config.py: TrainConfig (configs/*.yaml)
    train.py           the loop: epochs, steps, end-of-epoch validation, selection, early stop
    run.py             the Run it carries: datasets, model, optimiser, schedule
    run_identity.py    what --resume must find unchanged; the provenance a bundle records
    epoch_log.py       per-epoch and per-step CSV rows (OUT/metrics.csv, OUT/steps.csv)
    checkpoint.py      bit-for-bit resumable checkpoints
    data.py            the pair table, dataset and sampler (pool.py: seeded retrieval pools)
    validation.py      each epoch's dev loss and text->image recall
    stages.py          the two-stage recipe: heads.py (stage 1 on cached tower features,
                       features.py), then the main loop with locked towers
    folds.py           validation folds carved out of train, for selection without dev
    distributed.py     torchrun: process groups, negatives gathered across ranks
`convirt pretrain-text`
    pretrain_text.py   the masked-LM run (settings, loop, atomic save); pretrain_text_cli.py its
                       command line; text_corpus.py the sentences; mlm.py the model and loss
`convirt eval`
    evaluate.py        retrieval, image-image and label-query scores of a bundle on a split
    retrieval_scores.py  recall@k, precision@k and what chance scores
    probe.py           linear-probe classification (the paper's label efficiency)

A training run's path: cli.train_main -> train.train -> (train.text_stage: pretrain_text) ->
stages.run_stage1 -> run.start_run (run.build_datasets through the image cache) -> per epoch
train.train_epoch / train_step, then train.end_epoch (validation.validate, epoch_log,
checkpoint, bundle when select_by improved) -> OUT/bundle.
A new training setting goes in config.py and the code that reads it; a new evaluation score in
evaluate.py (its maths in retrieval_scores.py).
"""
