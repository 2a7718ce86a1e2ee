from django.urls import path
from push import views

urlpatterns = [
    path("", views.index),
    path("login", views.login),
    path("token", views.token),
    path("notify/<str:user>", views.notify),
    path("announce", views.announce),
]
