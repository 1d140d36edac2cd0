// identity_middleware example script
document.documentElement.dataset.ready = 'yes';
