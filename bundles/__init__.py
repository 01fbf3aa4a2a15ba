"""Committed bundles. The default one, cifar10-resnet-large, ships in the wheel as package data of
`exitserve.bundles`, so `exitserve serve` with no argument serves it from any install
(`exitserve.service.settings.DEFAULT_BUNDLE`); the others stay in the repository."""
